"""Early-exit CNNs (EENets) — Demir, "Early-Exit Convolutional Neural Networks", M.Sc. thesis, Middle East
Technical University, 2019 (with Akbas). https://open.metu.edu.tr/handle/11511/43526

Cost-aware exits: every exit block has a classifier and a *confidence branch* ``h_k(x) ∈ (0, 1)``; a sample stops
at the first exit whose confidence reaches 0.5. Training makes the confidences cost-aware: the network's output
is the mixture ``ŷ = Σ_k P_k ŷ_k`` with ``P_k = h_k Π_{j<k}(1 - h_j)`` (the last exit takes the rest), and the loss
is ``CE(ŷ, y) + λ Σ_k P_k c_k`` with ``c_k`` the MACs of stopping at exit ``k`` (fraction of the dense network).
Exits are placed by a cost *distribution* over the network: ``pareto`` (each exit at 20 % of the remaining cost,
cumulative fractions ``1 - 0.8^k``), ``golden`` (``1 - 0.618^k``), ``linear`` (``k / (E + 1)``) and ``quadratic``
(``(k / (E + 1))^2``), E the number of early exits.

Departures from the thesis:
* the thesis's "fine" distribution (exits after every block early in the network) is not offered;
* the confidence branch reads the pooled feature map (the thesis uses a small conv + pool + linear);
* the mixture loss is taken in probability space with the log of the mixture (CE of ``ŷ``), plus every exit's
  own cross-entropy with weight ``exit_ce_weight`` (0 drops it, as in the thesis; a small weight keeps early
  classifiers useful in short schedules);
* the cost term is charged only above the budget, ``λ max(0, mean_n Σ_k P_k c_k - budget)`` (the thesis charges
  every MAC, ``λ Σ_k P_k c_k``);
* thresholds (0.5) are calibrated for a MAC budget like every early-exit recipe.

Budget: trained and calibrated. ``budget`` (the target mean fraction of the dense MACs per image) is where the
thesis's cost term starts to charge: the expected MAC fraction of the batch above the budget costs ``λ``
(``cost_weight``) per unit, so training pulls the confidence branches to the budget from above and lets accuracy
decide below it. :func:`dynnet.calibrate` then fits the thresholds on the confidences ``h_k`` with MSDNet's geometric
exit profile until the mean MAC fraction on held-out images equals the budget.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets
from dynnet.core import LossOutput, Trace
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.gates import open_bias_
from dynnet.losses.early_exit import exit_mixture, expected_exit_cost
from dynnet.methods.early_exit._cascade import ExitCascade
from dynnet.methods.early_exit._common import ConvBranchHead, State
from dynnet.methods.early_exit._model import EarlyExitModel
from dynnet.methods.early_exit._trunk import plan_exits
from dynnet.methods.early_exit.calibration import operating_points

__all__ = ["DISTRIBUTIONS", "EENetCascade", "EENetConfig", "EENetModel", "convert", "exit_fractions"]

DISTRIBUTIONS = ("pareto", "golden", "linear", "quadratic")


def exit_fractions(distribution: str, num_early: int) -> tuple[float, ...]:
    """Cumulative MAC fractions of ``num_early`` exits under one of the thesis's cost distributions."""
    if num_early < 1:
        raise ValueError(f"num_early must be at least 1, got {num_early}")
    ks = range(1, num_early + 1)
    if distribution == "pareto":
        return tuple(1 - 0.8**k for k in ks)
    if distribution == "golden":
        return tuple(1 - (1 / ((1 + math.sqrt(5)) / 2)) ** k for k in ks)
    if distribution == "linear":
        return tuple(k / (num_early + 1) for k in ks)
    if distribution == "quadratic":
        return tuple((k / (num_early + 1)) ** 2 for k in ks)
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


@dataclass(frozen=True)
class EENetConfig:
    """Settings of EENets.

    Attributes:
        budget: target mean fraction of the dense MACs per image: the cost term charges the expected MAC fraction
            above it, and the thresholds are calibrated to it.
        distribution: exit placement by cost (``DISTRIBUTIONS``).
        num_early: early exits (before the final classifier).
        cost_weight: λ of the cost term (price of the dense network's MACs above the budget, in units of the
            loss).
        exit_ce_weight: weight of each exit's own cross-entropy (0: the thesis's loss).
    """

    budget: float = 0.5
    distribution: str = "pareto"
    num_early: int = 3
    cost_weight: float = 0.3
    exit_ce_weight: float = 0.1


class ConfidenceBranch(nn.Module):
    """``h_k``: pooled features Tensor[N, C, H, W] → logit Tensor[N] (sigmoid gives the confidence)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, 1)
        open_bias_(self.fc, logit=-6.0)  # starts "continue"

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1)).squeeze(1)


class EENetCascade(ExitCascade):
    """Exit score = the confidence branch ``h_k``."""

    def __init__(self, *args: object, branches: list[ConfidenceBranch], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.policy = nn.ModuleList(branches)

    def exit_score(self, k: int, h: State, logits: Tensor) -> Tensor:
        return torch.sigmoid(self.policy[k](h))


class EENetModel(EarlyExitModel):
    """Objective: ``CE(Σ_k P_k softmax(z_k), y) + λ max(0, mean_n Σ_k P_k c_k - budget)`` (+ optional per-exit
    CE)."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        budget = self.config.budget if budget is None else budget
        exits = self.exit_outputs(t)
        conf = [t.outputs[f"exit{k}/score"] for k in range(len(exits) - 1)]
        p_stop = exit_mixture(conf)  # Tensor[N, K]
        probs = torch.stack([z.softmax(1) for z in exits], 1)  # Tensor[N, K, C]
        mixture = (p_stop.unsqueeze(2) * probs).sum(1)
        nll = F.nll_loss(torch.log(mixture.clamp_min(1e-8)), target)
        cost = expected_exit_cost(p_stop.double(), self.stop_costs(t)).float().mean()
        over = F.relu(cost - budget)
        ce = sum(F.cross_entropy(z, target) for z in exits)
        total = nll + self.config.cost_weight * over + self.config.exit_ce_weight * ce
        parts = {
            "mixture": float(nll.detach()),
            "cost": float(cost.detach()),
            "over_budget": float(over.detach()),
            "ce": float(ce.detach()),
        }
        return LossOutput(total, parts)


@recipe(
    "early_exit_cnn",
    paper="Early-Exit Convolutional Neural Networks (M.Sc. thesis, METU 2019), "
    "https://open.metu.edu.tr/handle/11511/43526",
    budget=BudgetPolicy(
        "trained+calibrated",
        knob="exit thresholds (geometric exit profile) on the confidences h_k",
        reachable=(0.45, 1.0),
        derives="the MAC fraction above which the cost term λ Σ_k P_k c_k charges; thresholds on h_k (calibration)",
    ),
    bench_metrics=operating_points,  # the exits' accuracy and operating points in `dynnet bench`
)
def convert(model: nn.Module, config: EENetConfig, targets: Targets = "auto") -> EENetModel:
    """Attach EENet exit blocks (classifier + confidence branch) to ``model`` (in place). ``targets`` is unused."""
    plan = plan_exits(model, exit_fractions(config.distribution, config.num_early))
    heads = [ConvBranchHead(c, plan.num_classes, width=c, stride=2) for c in plan.channels]
    branches = [ConfidenceBranch(c) for c in plan.channels]
    cascade = EENetCascade(model, plan.trunk, plan.positions, heads, branches=branches, thresholds=0.5)
    return EENetModel(cascade, recipe="early_exit_cnn", config=copy.copy(config), in_channels=plan.in_channels)
