"""CDL — Panda, Sengupta & Roy, "Conditional Deep Learning for Energy-Efficient and Enhanced Pattern
Recognition", DATE 2016. https://arxiv.org/abs/1509.08971

Linear classifiers are attached to intermediate feature maps of an already trained network; the base network
is not changed by them. At inference the cascade is confidence-gated: a sample stops at the first linear
classifier whose output confidence reaches that stage's threshold, otherwise it continues to the next stage.

Departures from the paper:
* each linear classifier sees globally average-pooled features (the paper feeds the flattened feature map of
  small MNIST/CIFAR networks to the linear layer; pooling keeps the heads cheap on larger networks);
* the confidence is the maximum softmax probability (the paper thresholds the maximum output activation);
* classifiers are placed at fixed fractions of the trunk's MACs instead of the paper's greedy stage-by-stage
  addition that keeps a stage only if it lowers the energy;
* the linear classifiers and the base network can be trained in one run: the classifiers see detached features,
  so the base network's gradients come only from its own classifier (as when training them after the base);
* thresholds are calibrated on a validation split for a target mean MAC budget (the paper hand-picks them);
* each linear classifier's cross-entropy is weighted by a weight derived from the budget (the paper trains each
  stage's classifier on its own).

Budget: calibrated. ``budget`` (the target mean fraction of the dense MACs per image) sets the stages' confidence
thresholds: :func:`dynnet.calibrate` fits them with MSDNet's geometric exit profile until the mean MAC fraction on
held-out images equals it (the paper's energy target becomes a MAC target). It also weights the linear classifiers'
losses: ``w_k = (1 + K q_k) / 2``, ``q_k`` the share of images classifier ``k`` serves at the budget
(:func:`~dynnet.methods.early_exit._common.budget_exit_weights`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets
from dynnet.core import LossOutput, Trace
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.methods.early_exit._cascade import ExitCascade
from dynnet.methods.early_exit._common import PooledLinearHead, State
from dynnet.methods.early_exit._model import EarlyExitModel
from dynnet.methods.early_exit._trunk import plan_exits
from dynnet.methods.early_exit.calibration import operating_points

__all__ = ["CDLCascade", "CDLConfig", "CDLModel", "convert"]


@dataclass(frozen=True)
class CDLConfig:
    """Settings of CDL.

    Attributes:
        budget: target mean fraction of the dense MACs per image: the stages' confidence thresholds are calibrated
            to it, and it weights the linear classifiers' losses (``(1 + K q_k) / 2``, ``q_k`` the share of images
            classifier ``k`` serves at the budget).
        exit_fractions: cumulative fractions of the trunk's MACs after which linear classifiers go.
        train_base: also train the base network on its own cross-entropy (``False``: only the classifiers).
    """

    budget: float = 0.5
    exit_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    train_base: bool = True


class CDLCascade(ExitCascade):
    """Linear classifiers on detached features: they never change the base network."""

    def exit_logits(self, k: int, h: State, carry: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self.exits[k](h.detach()), carry


class CDLModel(EarlyExitModel):
    """Objective: the base network's cross-entropy (if ``train_base``) + every linear classifier's, weighted by the
    budget's exit weights."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        exits = self.exit_outputs(t)
        weights = self.exit_weights(t, budget)
        linear = sum(w * F.cross_entropy(z, target) for z, w in zip(exits[:-1], weights, strict=False))
        final = F.cross_entropy(exits[-1], target)
        total = linear + final if self.config.train_base else linear + 0.0 * final
        return LossOutput(total, {"linear": float(linear.detach()), "final": float(final.detach())})


@recipe(
    "cdl",
    paper="Conditional Deep Learning for Energy-Efficient and Enhanced Pattern Recognition (DATE 2016), "
    "arXiv:1509.08971",
    budget=BudgetPolicy(
        "calibrated",
        knob="exit thresholds (geometric exit profile)",
        reachable=(0.45, 1.0),
        derives="confidence thresholds of the stages (calibration); linear classifiers' loss weights (1 + K q_k) / 2",
    ),
    bench_metrics=operating_points,  # the exits' accuracy and operating points in `dynnet bench`
)
def convert(model: nn.Module, config: CDLConfig, targets: Targets = "auto") -> CDLModel:
    """Attach CDL's linear classifiers to ``model`` (in place). ``targets`` is unused."""
    plan = plan_exits(model, config.exit_fractions)
    heads = [PooledLinearHead(c, plan.num_classes) for c in plan.channels]
    cascade = CDLCascade(model, plan.trunk, plan.positions, heads)
    return CDLModel(cascade, recipe="cdl", config=copy.copy(config), in_channels=plan.in_channels)
