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
  own cross-entropy with weight ``exit_ce_weight`` (0 reproduces the thesis's loss; a small weight keeps early
  classifiers useful in short schedules);
* thresholds (0.5) can be recalibrated for a MAC budget like every early-exit recipe.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets
from dynnet.core import LossOutput, RecipeSpec, Trace, register_recipe
from dynnet.gates import open_bias_
from dynnet.losses.early_exit import exit_mixture, expected_exit_cost
from dynnet.methods.early_exit._common import ConvBranchHead, EarlyExitModel, ExitCascade, State, plan_exits

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
        budget: target mean MACs as a fraction of the dense network (calibration only).
        distribution: exit placement by cost (``DISTRIBUTIONS``).
        num_early: early exits (before the final classifier).
        cost_weight: λ of the cost term.
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
    """Objective: ``CE(Σ_k P_k softmax(z_k), y) + λ Σ_k P_k c_k`` (+ optional per-exit CE)."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        exits = self.exit_outputs(t)
        conf = [t.outputs[f"exit{k}/score"] for k in range(len(exits) - 1)]
        p_stop = exit_mixture(conf)  # Tensor[N, K]
        probs = torch.stack([z.softmax(1) for z in exits], 1)  # Tensor[N, K, C]
        mixture = (p_stop.unsqueeze(2) * probs).sum(1)
        nll = F.nll_loss(torch.log(mixture.clamp_min(1e-8)), target)
        cost = expected_exit_cost(p_stop.double(), self.stop_costs(t)).float().mean()
        ce = sum(F.cross_entropy(z, target) for z in exits)
        total = nll + self.config.cost_weight * cost + self.config.exit_ce_weight * ce
        parts = {"mixture": float(nll.detach()), "cost": float(cost.detach()), "ce": float(ce.detach())}
        return LossOutput(total, parts)


def convert(model: nn.Module, config: EENetConfig, targets: Targets = "auto") -> EENetModel:
    """Attach EENet exit blocks (classifier + confidence branch) to ``model`` (in place). ``targets`` is unused."""
    plan = plan_exits(model, exit_fractions(config.distribution, config.num_early))
    heads = [ConvBranchHead(c, plan.num_classes, width=c, stride=2) for c in plan.channels]
    branches = [ConfidenceBranch(c) for c in plan.channels]
    cascade = EENetCascade(model, plan.trunk, plan.positions, heads, branches=branches, thresholds=0.5)
    return EENetModel(cascade, recipe="early_exit_cnn", config=copy.copy(config), in_channels=plan.in_channels)


SPEC = register_recipe(
    RecipeSpec(
        name="early_exit_cnn",
        family="early_exit",
        config_cls=EENetConfig,
        convert=convert,
        paper="Early-Exit Convolutional Neural Networks (M.Sc. thesis, METU 2019), "
        "https://open.metu.edu.tr/handle/11511/43526",
    )
)
