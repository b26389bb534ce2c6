"""Hierarchical early exits — Passalis, Raitoharju, Tefas & Gabbouj, "Efficient adaptive inference for deep
convolutional neural networks using hierarchical early exits", Pattern Recognition 105, 2020.
https://doi.org/10.1016/j.patcog.2020.107346

Each early exit is a bag-of-features (BoF) head: every spatial feature vector is softly quantised against a
learned codebook (``M`` codewords, similarities normalised over codewords) and the memberships are averaged into
a histogram — a compact, size-independent representation. Exits aggregate hierarchically: the histogram exit
``k`` classifies is a learned mix of its own histogram and the aggregated histogram of the exits before it, so
later exits reuse what earlier ones computed. A sample stops at the first exit confident enough.

Departures from the paper:
* the codeword similarity is a 1×1 convolution followed by a softmax over codewords (the paper's neural BoF
  uses an RBF kernel on the Euclidean distance, normalised the same way);
* the aggregation is ``s̃_k = β_k s_k + (1 - β_k) s̃_{k-1}`` with ``β_k = sigmoid(b_k)`` learnable (the paper
  weights earlier exits' representations by a fixed or learned scheme of the same form);
* the exit rule thresholds the maximum softmax, calibrated for a MAC budget on a validation split, instead of
  the paper's threshold on the activation relative to its training mean;
* the final exit is the base network's classifier; exits are placed at fractions of the trunk's MACs;
* the exits' loss weights are derived from the budget (the paper weights the exits' losses equally).

Budget: calibrated. ``budget`` (the target mean fraction of the dense MACs per image) sets the exits' maximum-softmax
thresholds: :func:`dynnet.calibrate` fits them with MSDNet's geometric exit profile until the mean MAC fraction on
held-out images equals it. It also sets the exits' loss weights when ``exit_weights`` is ``None``:
``w_k = (1 + K q_k) / 2``, ``q_k`` the share of images exit ``k`` serves at the budget
(:func:`~dynnet.methods.early_exit._common.budget_exit_weights`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.methods.early_exit._cascade import ExitCascade
from dynnet.methods.early_exit._common import State
from dynnet.methods.early_exit._model import EarlyExitModel
from dynnet.methods.early_exit._trunk import plan_exits
from dynnet.methods.early_exit.calibration import operating_points

__all__ = ["BoFHead", "HierarchicalExitsConfig", "bag_of_features", "convert"]


def bag_of_features(features: Tensor, codebook: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft BoF histogram.

    Args:
        features: Tensor[N, C, H, W].
        codebook: Tensor[M, C] codewords.
        temperature: softmax temperature of the memberships.

    Returns:
        Tensor[N, M]: mean over the H·W positions of each position's softmax membership over the codewords
        (rows sum to 1).
    """
    sim = F.conv2d(features, codebook[:, :, None, None])  # Tensor[N, M, H, W]
    return (sim / temperature).softmax(1).mean((2, 3))


class BoFHead(nn.Module):
    """BoF histogram of the feature map, hierarchical mixing with the previous exits', linear classifier."""

    def __init__(self, in_channels: int, codewords: int, num_classes: int, *, first: bool) -> None:
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(codewords, in_channels) / in_channels**0.5)
        self.fc = nn.Linear(codewords, num_classes)
        self.mix = None if first else nn.Parameter(torch.zeros(()))

    def forward(self, h: Tensor, previous: Tensor | None) -> tuple[Tensor, Tensor]:
        """Tensor[N, C, H, W] and the previous aggregated histogram Tensor[N, M] (or ``None``) →
        (logits Tensor[N, K], aggregated histogram Tensor[N, M])."""
        s = bag_of_features(h, self.codebook)
        if self.mix is not None and previous is not None:
            beta = torch.sigmoid(self.mix)
            s = beta * s + (1.0 - beta) * previous
        return self.fc(s * s.shape[1]), s  # × M: histograms have mean 1/M; keep the logits' scale sensible


@dataclass(frozen=True)
class HierarchicalExitsConfig:
    """Settings of hierarchical BoF exits.

    Attributes:
        budget: target mean fraction of the dense MACs per image: the exit thresholds are calibrated to it, and it
            sets the exits' loss weights when ``exit_weights`` is ``None``.
        exit_fractions: cumulative fractions of the trunk's MACs after which exits go.
        codewords: M, the codebook size of every exit.
        exit_weights: loss weight of every exit, final one last (``None``: derived from the budget,
            ``(1 + K q_k) / 2`` with ``q_k`` the share of images exit ``k`` serves at the budget).
    """

    budget: float = 0.5
    exit_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    codewords: int = 32
    exit_weights: tuple[float, ...] | None = None


class HierarchicalCascade(ExitCascade):
    """The carry between exits is the aggregated histogram."""

    def exit_logits(self, k: int, h: State, carry: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self.exits[k](h, carry)


@recipe(
    "hierarchical_exits",
    paper="Efficient adaptive inference for deep convolutional neural networks using hierarchical early exits "
    "(Pattern Recognition 2020), doi:10.1016/j.patcog.2020.107346",
    budget=BudgetPolicy(
        "calibrated",
        knob="exit thresholds (geometric exit profile)",
        reachable=(0.45, 1.0),
        derives="maximum-softmax thresholds of the exits (calibration); exit loss weights (1 + K q_k) / 2",
    ),
    bench_metrics=operating_points,  # the exits' accuracy and operating points in `dynnet bench`
)
def convert(model: nn.Module, config: HierarchicalExitsConfig, targets: Targets = "auto") -> EarlyExitModel:
    """Attach hierarchical BoF exits to ``model`` (in place). ``targets`` is unused."""
    plan = plan_exits(model, config.exit_fractions)
    heads = [BoFHead(c, config.codewords, plan.num_classes, first=i == 0) for i, c in enumerate(plan.channels)]
    cascade = HierarchicalCascade(model, plan.trunk, plan.positions, heads)
    return EarlyExitModel(cascade, recipe="hierarchical_exits", config=copy.copy(config), in_channels=plan.in_channels)
