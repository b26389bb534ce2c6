"""BranchyNet — Teerapittayanon, McDanel & Kung, "BranchyNet: Fast Inference via Early Exiting from Deep Neural
Networks", ICPR 2016. https://arxiv.org/abs/1709.01686

Side branches (a few conv layers and a classifier) are attached to the trunk; the network is trained jointly on
the weighted sum of every exit's cross-entropy; at inference a sample leaves at the first branch whose softmax
entropy is below that branch's threshold.

Departures from the paper:
* branches are one conv3×3-BN-ReLU (strided when the map is larger than 8×8) + pool + linear, placed at fixed
  fractions of the trunk's MACs (the paper hand-places one or two branches of one or two conv layers);
* the entropy is normalised to a confidence ``1 - H / log K`` (exit when it reaches the threshold, which is
  the same rule as ``H <= threshold'``);
* thresholds are not hand-tuned: they start at "never exit" and are calibrated on a validation split for a
  target mean MAC budget (:func:`dynnet.calibrate`), as MSDNet does;
* exit weights are derived from the budget (the paper uses per-network hand-set weights).

Budget: calibrated. ``budget`` (the target mean fraction of the dense MACs per image) sets the branches' entropy
thresholds: :func:`dynnet.calibrate` fits them with MSDNet's geometric exit profile until the mean MAC fraction on
held-out images equals the budget. It also derives the paper's exit loss weights (unless ``exit_weights`` is set):
``w_k = (1 + K q_k) / 2`` with ``q_k`` the share of images exit ``k`` serves at the budget
(:func:`~dynnet.methods.early_exit._common.budget_exit_weights`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import Tensor, nn

from dynnet.convert import Targets
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.methods.early_exit._cascade import ExitCascade
from dynnet.methods.early_exit._common import ConvBranchHead, State, entropy_confidence
from dynnet.methods.early_exit._model import EarlyExitModel
from dynnet.methods.early_exit._trunk import plan_exits
from dynnet.methods.early_exit.calibration import operating_points

__all__ = ["BranchyNetCascade", "BranchyNetConfig", "convert"]


@dataclass(frozen=True)
class BranchyNetConfig:
    """Settings of BranchyNet.

    Attributes:
        budget: target mean fraction of the dense MACs per image: the exits' entropy thresholds are calibrated to
            it, and it sets the exit loss weights when ``exit_weights`` is ``None``.
        exit_fractions: cumulative fractions of the trunk's MACs after which branches go.
        exit_weights: loss weight of every exit, final one last (``None``: derived from the budget,
            ``(1 + K q_k) / 2`` with ``q_k`` the share of images exit ``k`` serves at the budget).
        branch_depth: conv layers per branch.
    """

    budget: float = 0.5
    exit_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    exit_weights: tuple[float, ...] | None = None
    branch_depth: int = 1


class BranchyNetCascade(ExitCascade):
    """Exits on the normalised entropy of each branch's softmax."""

    def exit_score(self, k: int, h: State, logits: Tensor) -> Tensor:
        return entropy_confidence(logits)


@recipe(
    "branchynet",
    paper="BranchyNet: Fast Inference via Early Exiting from Deep Neural Networks (ICPR 2016), arXiv:1709.01686",
    budget=BudgetPolicy(
        "calibrated",
        knob="exit thresholds (geometric exit profile)",
        reachable=(0.45, 1.0),
        derives="entropy thresholds of the branches (calibration); exit loss weights (1 + K q_k) / 2",
    ),
    bench_metrics=operating_points,  # the exits' accuracy and operating points in `dynnet bench`
)
def convert(model: nn.Module, config: BranchyNetConfig, targets: Targets = "auto") -> EarlyExitModel:
    """Attach BranchyNet side branches to ``model`` (in place). ``targets`` is unused: exits go by MAC fraction."""
    plan = plan_exits(model, config.exit_fractions)
    heads = [ConvBranchHead(c, plan.num_classes, width=c, depth=config.branch_depth, stride=2) for c in plan.channels]
    cascade = BranchyNetCascade(model, plan.trunk, plan.positions, heads)
    return EarlyExitModel(cascade, recipe="branchynet", config=copy.copy(config), in_channels=plan.in_channels)
