"""DynExit — Wang, Lu, Liu, Qiu & Lou, "DynExit: A Dynamic Early-Exit Strategy for Deep Residual Networks",
IEEE SiPS 2019. https://doi.org/10.1109/SiPS47522.2019.9020551

The exits' loss weights and the exit thresholds are trained with the network instead of being hand-set:
the multi-exit loss weights adapt during training, and each exit's confidence threshold is a trainable
parameter that a compute-cost term pushes down (exit earlier) while the classification loss of the samples
that actually exit pushes it up.

Our formulation:
* trainable loss weights with homoscedastic-uncertainty weighting, ``Σ_k exp(-s_k) CE_k + s_k``
  (which cannot collapse to zero weights);
* exit ``k`` stops a sample when its maximum softmax ``c_k`` reaches ``θ_k``; in training the hard decision
  is straight-through with the gradient of ``sigmoid((c_k - θ_k) / τ)``, so the network's output (the
  logits of the exit each sample stops at), its cross-entropy and the MAC-budget loss
  ``(mean MACs / dense - budget)^2`` all reach ``θ``.

Departures from the paper:
* the weighting rule above replaces the paper's normalised trainable weights, and the budget loss replaces its
  cost term (same role: trade accuracy for computation through trainable thresholds);
* thresholds start at 1.05, just above the largest confidence (no sample exits), instead of the paper's
  initial values; exits are BranchyNet-style branches placed at fractions of the trunk's MACs;
* after training the thresholds are calibrated for the budget on a validation split (MSDNet's geometric exit
  profile), which overrides the trained values.

Budget: trained and calibrated. ``budget`` (the target mean fraction of the dense MACs per image) is the target of
the MAC-budget loss that trains the thresholds ``θ`` (the paper's cost term); :func:`dynnet.calibrate` then fits the
thresholds with MSDNet's geometric exit profile until the mean MAC fraction on held-out images equals it.
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
from dynnet.estimators import straight_through
from dynnet.methods.early_exit._cascade import ExitCascade
from dynnet.methods.early_exit._common import ConvBranchHead
from dynnet.methods.early_exit._model import EarlyExitModel
from dynnet.methods.early_exit._trunk import plan_exits
from dynnet.methods.early_exit.calibration import operating_points

__all__ = ["DynExitCascade", "DynExitConfig", "DynExitModel", "convert"]


@dataclass(frozen=True)
class DynExitConfig:
    """Settings of DynExit.

    Attributes:
        budget: target mean fraction of the dense MACs per image: the target of the MAC-budget loss that trains the
            thresholds, and of their calibration.
        exit_fractions: cumulative fractions of the trunk's MACs after which exits go.
        tau: temperature of the thresholds' sigmoid relaxation.
        budget_weight: weight of the MAC-budget loss.
        output_weight: weight of the cross-entropy of the network's output (the exit each sample stops at).
        initial_threshold: θ at conversion (above 1: no sample exits).
    """

    budget: float = 0.5
    exit_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    tau: float = 0.05
    budget_weight: float = 4.0
    output_weight: float = 1.0
    initial_threshold: float = 1.05


class DynExitCascade(ExitCascade):
    """Trainable thresholds with a straight-through sigmoid relaxation in training."""

    def decide(self, k: int, score: Tensor) -> tuple[Tensor, Tensor | None]:
        thr = self.gates.threshold[k]
        hard = (score >= thr).to(score.dtype)
        if not self.training:
            return hard, None
        soft = torch.sigmoid((score - thr) / self.tau)
        return straight_through(hard, soft), soft


class DynExitModel(EarlyExitModel):
    """Objective: uncertainty-weighted exit losses + output cross-entropy + MAC-budget loss."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.log_vars = nn.Parameter(torch.zeros(self.num_exits))

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        budget = self.config.budget if budget is None else budget
        exits = self.exit_outputs(t)
        ce = torch.stack([F.cross_entropy(z, target) for z in exits])
        weighted = (torch.exp(-self.log_vars) * ce + self.log_vars).sum()
        output = F.cross_entropy(logits, target)
        b = t.budget_loss(budget)
        total = weighted + self.config.output_weight * output + self.config.budget_weight * b
        parts = {"exits": float(weighted.detach()), "output": float(output.detach()), "budget": float(b.detach())}
        parts["mac_fraction"] = float(t.mac_fraction().mean().detach())
        return LossOutput(total, parts)


@recipe(
    "dynexit",
    paper="DynExit: A Dynamic Early-Exit Strategy for Deep Residual Networks (SiPS 2019), "
    "doi:10.1109/SiPS47522.2019.9020551",
    budget=BudgetPolicy(
        "trained+calibrated",
        knob="exit thresholds (geometric exit profile)",
        reachable=(0.45, 1.0),
        derives="target of the MAC-budget loss on the trainable thresholds θ; θ (calibration)",
    ),
    bench_metrics=operating_points,  # the exits' accuracy and operating points in `dynnet bench`
)
def convert(model: nn.Module, config: DynExitConfig, targets: Targets = "auto") -> DynExitModel:
    """Attach exits with trainable thresholds to ``model`` (in place). ``targets`` is unused."""
    plan = plan_exits(model, config.exit_fractions)
    heads = [ConvBranchHead(c, plan.num_classes, width=c, stride=2) for c in plan.channels]
    cascade = DynExitCascade(
        model, plan.trunk, plan.positions, heads, thresholds=config.initial_threshold, trainable_thresholds=True
    )
    cascade.tau = config.tau
    return DynExitModel(cascade, recipe="dynexit", config=copy.copy(config), in_channels=plan.in_channels)
