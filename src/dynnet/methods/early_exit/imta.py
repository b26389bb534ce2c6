"""IMTA — Li, Zhang, Bao, Xiang, Xu & Huang, "Improved Techniques for Training Adaptive Deep Networks",
ICCV 2019. https://arxiv.org/abs/1908.06294

MSDNet (:mod:`.msdnet`) trained with the paper's three techniques:

* gradient equilibrium (GE): where the coarsest feature map after block ``k`` feeds both classifier ``k`` and
  the rest of the network, the gradient from the classifier is scaled by ``1 / (K - k)`` and the gradient from
  later blocks by ``(K - k - 1) / (K - k)`` (:func:`gradient_rescale`), so the many losses downstream do not
  swamp the shared layers;
* inline subnetwork collaboration (ISC): classifier ``k`` adds a weighted copy of classifier ``k - 1``'s logits,
  ``z_k = f_k(x) + α_k z_{k-1}``;
* one-for-all knowledge distillation (OFA): the last classifier teaches every earlier one,
  ``L = CE(z_K, y) + Σ_{k<K} [(1 - λ) CE(z_k, y) + λ T² KL(softmax(z_K / T) || softmax(z_k / T))]``.

Inference is MSDNet's: maximum-softmax thresholds calibrated for a budget on a validation split.

Departures from the paper:
* one training stage with all three techniques (the paper trains with GE first, then adds ISC and OFA);
* ``α_k`` are learnable scalars initialised to 0, so the converted network starts as the MSDNet it converts
  and reproduces it with open gates (the paper feeds the previous logits through the classifier's own layers);
* the small ``msdnet_tiny`` base (see :mod:`.msdnet`);
* each classifier's term of the objective is weighted by a weight derived from the budget (the paper: all 1).

Budget: calibrated. ``budget`` (the target mean fraction of the static network's MACs per image) is MSDNet's
budgeted-batch budget: :func:`dynnet.calibrate` fits the exit thresholds with the geometric exit profile until the
mean MAC fraction on held-out images equals it. It also weights the classifiers' terms when ``exit_weights`` is
``None``: ``w_k = (1 + K q_k) / 2``, ``q_k`` the share of images classifier ``k`` serves at the budget
(:func:`~dynnet.methods.early_exit._common.budget_exit_weights`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets
from dynnet.core import LossOutput, Trace
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.losses.early_exit import exit_distillation_loss
from dynnet.methods.early_exit._common import State, gradient_rescale
from dynnet.methods.early_exit._model import EarlyExitModel
from dynnet.methods.early_exit.calibration import operating_points
from dynnet.methods.early_exit.msdnet import MSDNetCascade, _cascade

__all__ = ["IMTACascade", "IMTAConfig", "IMTAModel", "convert"]


@dataclass(frozen=True)
class IMTAConfig:
    """Settings of IMTA.

    Attributes:
        budget: target mean fraction of the static network's MACs per image: the exit thresholds are calibrated to
            it, and it sets the classifiers' weights when ``exit_weights`` is ``None``.
        gradient_equilibrium: rescale gradients at every exit (GE).
        inline_collaboration: add the previous exit's weighted logits (ISC).
        distill_weight: λ of the one-for-all distillation (0 disables it; the paper uses 0.5).
        temperature: T of the distillation.
        exit_weights: weight of every classifier's term, last one last (``None``: derived from the budget,
            ``(1 + K q_k) / 2`` with ``q_k`` the share of images classifier ``k`` serves at the budget; the paper
            uses all 1).
    """

    budget: float = 0.5
    gradient_equilibrium: bool = True
    inline_collaboration: bool = True
    distill_weight: float = 0.5
    temperature: float = 2.0
    exit_weights: tuple[float, ...] | None = None


class IMTACascade(MSDNetCascade):
    """MSDNet with gradient equilibrium and inline subnetwork collaboration."""

    def __init__(self, *args: object, collaborate: bool, equilibrium: bool, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.equilibrium = equilibrium
        self.collaborate = collaborate
        # α_k for exits 1..K-1 (ISC weights); the first exit has no predecessor.
        self.alpha = nn.Parameter(torch.zeros(self.num_exits - 1)) if collaborate else None

    def _rescaled(self, h: State, scale: float) -> State:
        if not (self.equilibrium and self.training and torch.is_grad_enabled()):
            return h
        return (*h[:-1], gradient_rescale(h[-1], scale))

    def segment(self, k: int, h: State) -> State:
        if k > 0:  # gradient reaching exit k-1's features from the rest of the network
            j = k - 1
            h = self._rescaled(h, (self.num_exits - j - 1) / (self.num_exits - j))
        return super().segment(k, h)

    def _collaborate(self, k: int, logits: Tensor, carry: Tensor | None) -> Tensor:
        if self.alpha is None or carry is None:
            return logits
        return logits + self.alpha[k - 1] * carry

    def exit_logits(self, k: int, h: State, carry: Tensor | None) -> tuple[Tensor, Tensor | None]:
        h = self._rescaled(h, 1.0 / (self.num_exits - k))
        logits = self._collaborate(k, self.classifiers[k](h[-1]), carry)
        return logits, logits

    def final_logits(self, h: State, carry: Tensor | None) -> Tensor:
        return self._collaborate(self.num_exits - 1, self.classifiers[-1](h[-1]), carry)


class IMTAModel(EarlyExitModel):
    """Objective: last exit's cross-entropy + one-for-all distillation mixed with each earlier exit's CE, each
    classifier's term weighted by ``exit_weights`` (derived from the budget by default)."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        exits = self.exit_outputs(t)
        w = self.exit_weights(t, budget)
        lam, temp = self.config.distill_weight, self.config.temperature
        final = w[-1] * F.cross_entropy(exits[-1], target)
        ce = sum(wk * F.cross_entropy(z, target) for z, wk in zip(exits[:-1], w, strict=False))
        kd = sum(wk * exit_distillation_loss(z, exits[-1], temp) for z, wk in zip(exits[:-1], w, strict=False))
        total = final + (1.0 - lam) * ce + lam * kd
        return LossOutput(
            total, {"final": float(final.detach()), "ce": float(ce.detach()), "distill": float(kd.detach())}
        )


@recipe(
    "imta",
    paper="Improved Techniques for Training Adaptive Deep Networks (ICCV 2019), arXiv:1908.06294",
    budget=BudgetPolicy(
        "calibrated",
        knob="exit thresholds (geometric exit profile)",
        reachable=(0.3, 1.0),
        derives="maximum-softmax thresholds of the classifiers (calibration); classifier weights (1 + K q_k) / 2",
    ),
    test_base="msdnet_tiny",
    bench_metrics=operating_points,  # the exits' accuracy and operating points in `dynnet bench`
)
def convert(model: nn.Module, config: IMTAConfig, targets: Targets = "auto") -> IMTAModel:
    """IMTA on an :class:`~dynnet.methods.early_exit.msdnet.MSDNet` (in place). ``targets`` is unused."""
    cascade = _cascade(
        model, IMTACascade, collaborate=config.inline_collaboration, equilibrium=config.gradient_equilibrium
    )
    in_channels = model.stem.convs[0][0].in_channels
    return IMTAModel(cascade, recipe="imta", config=copy.copy(config), in_channels=in_channels)
