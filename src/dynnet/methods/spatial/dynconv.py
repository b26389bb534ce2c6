"""DynConv — Verelst & Tuytelaars, "Dynamic Convolutions: Exploiting Spatial Sparsity for Faster Inference",
CVPR 2020. https://openaccess.thecvf.com/content_CVPR_2020/html/Verelst_Dynamic_Convolutions_Exploiting_Spatial_Sparsity_for_Faster_Inference_CVPR_2020_paper.html
(arXiv:1912.03203, code: github.com/thomasverelst/dynconv).

Every residual block gets a squeeze mask unit (3×3 conv to one channel at the block's output stride plus
a global-pool FC term) whose per-pixel logits are sampled with Gumbel-Sigmoid (hard, straight-through).
The block computes ``out = post(shortcut(x) + M ⊙ branch(x))`` where the first convolution runs on the
*dilated* mask (the positions the second 3×3 convolution reads) and the second on the mask itself. In
sparse mode the branch runs by gather → GEMM → scatter on the active positions only
(:func:`dynnet.kernels.spatial.gather_conv_rows`); the executed MACs count the dilated positions and
the mask unit, exactly as the paper's FLOP count does.

Objective (the paper's ``SparsityCriterion``): cross-entropy + ``sparsity_weight`` × (network term
``(MACs/dense - budget)^2`` + per-block term), where the per-block term keeps each block's cost fraction
within ``[lower, upper]`` bounds that start at the budget and are annealed to ``[0, 1]`` over the first
``anneal_fraction`` of training (``progress = cos(p·π/2)^2``).

Departures from the paper:
* the network term divides by the MACs of the whole network (static stem and classifier included); the
  paper's code divides the masked convolutions' FLOPs by their dense FLOPs — the same up to the static part;
* training progress reaches the model through :class:`DynConvAnnealing` (a :mod:`dynnet.train` hook) that
  sets ``model.progress`` (fraction of the run done); without it ``progress`` stays 0 (tight bounds);
* mask units start open (bias 6) so a fresh conversion reproduces the base network; the paper trains
  from a pretrained network with masks initialised at random;
* gather/scatter is pure PyTorch (index_select + mm), the paper uses custom CUDA kernels; BN after the
  gathered convolutions uses running statistics on the compact rows (the paper fuses BN the same way).

Budget: trained and calibrated. ``budget`` (the target fraction of the dense MACs) is the paper's
``sparsity_target`` (the network term pulls the MAC fraction to it) and the starting value of the per-block
bounds; calibration then adds one offset to the logit of every mask unit (the bias of its 3×3 convolution,
which the compiled ``squeeze_logits`` path reads too; the offset is kept in ``calibration[0]``) until the mean
MAC fraction on held-out images equals the budget. Reachable: 0.1–1.0 (the stem, shortcut convolutions,
classifier and mask units always run: about 3–7 % of a CIFAR ResNet).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.blocks import SpatialResidual
from dynnet.convert import Targets, first_conv_in_channels, replace_module
from dynnet.core import Decision, DynamicModel, LossOutput, Trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.estimators import gumbel_sigmoid
from dynnet.losses import mac_budget_loss
from dynnet.methods.spatial._common import chain_stride, spatial_targets
from dynnet.methods.spatial.gates import SqueezeMaskUnit
from dynnet.train.hooks import FitState, Hook

__all__ = ["DynConv", "DynConvAnnealing", "DynConvBlock", "DynConvConfig", "block_bounds", "block_sparsity_loss"]


@dataclass(frozen=True)
class DynConvConfig:
    """Settings of DynConv.

    Attributes:
        budget: target mean fraction of the dense MACs per image, mask units included (the paper's
            ``sparsity_target``); also where the per-block bounds start.
        tau: Gumbel-Sigmoid temperature (the paper uses 1).
        sparsity_weight: weight of the sparsity criterion (10 in the paper's code).
        anneal_fraction: fraction of training over which the per-block bounds relax (0.33 in the paper).
    """

    budget: float = 0.5
    tau: float = 1.0
    sparsity_weight: float = 10.0
    anneal_fraction: float = 0.33


class DynConvBlock(SpatialResidual):
    """A residual block with a DynConv squeeze mask unit; decisions are Tensor[N, H_out, W_out]."""

    granularity = "spatial"

    def decide(self, x: Tensor) -> Decision:
        logits = self.gate(x)
        hard, prob = gumbel_sigmoid(logits, self.tau, noise=self.training)
        return Decision(hard=hard, soft=prob, granularity="spatial")


def block_bounds(progress: float, budget: float, anneal_fraction: float) -> tuple[float, float]:
    """DynConv's annealed per-block bounds ``(lower, upper)`` at ``progress`` ∈ [0, 1] of training."""
    p = progress / anneal_fraction if anneal_fraction > 0 else 1.0
    c = math.cos(min(max(p, 0.0), 1.0) * math.pi / 2) ** 2
    return c * budget, 1.0 - c * (1.0 - budget)


def block_sparsity_loss(fractions: list[Tensor], lower: float, upper: float) -> Tensor:
    """Mean over blocks of ``relu(f - upper)^2 + relu(lower - f)^2`` for scalar cost fractions ``f``."""
    if not fractions:
        raise ValueError("block_sparsity_loss needs at least one block")
    terms = [F.relu(f - upper) ** 2 + F.relu(lower - f) ** 2 for f in fractions]
    return sum(terms[1:], terms[0]) / len(terms)


class DynConv(DynamicModel):
    """The converted network; ``progress`` (fraction of training done) drives the per-block bounds."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.progress = 0.0

    def budget_knob(self) -> Knob:
        """One offset added to the logit of every mask unit (the bias of its 3×3 convolution)."""
        return self.logit_shift_knob([(b.gate.conv.bias, None, 1.0) for _, b in self.blocks()])

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        budget = self.config.budget if budget is None else budget
        task = F.cross_entropy(logits, target)
        network = mac_budget_loss(t.macs(), t.dense_macs(), budget)
        fractions = [(e.macs.mean() / e.dense).float() for e in t.entries if e.name.endswith("/body") and e.dense]
        lower, upper = block_bounds(self.progress, budget, self.config.anneal_fraction)
        blocks = block_sparsity_loss(fractions, lower, upper)
        total = task + self.config.sparsity_weight * (network + blocks)
        parts = {"task": float(task.detach()), "network": float(network.detach()), "blocks": float(blocks.detach())}
        return LossOutput(total, parts)


class DynConvAnnealing(Hook):
    """A :mod:`dynnet.train` hook that sets ``model.progress = step / total_steps`` before each step."""

    def on_fit_start(self, state: FitState) -> None:
        self._set(state)

    def on_step_end(self, state: FitState) -> None:
        self._set(state)

    @staticmethod
    def _set(state: FitState) -> None:
        if hasattr(state.model, "progress"):
            state.model.progress = state.step / max(1, state.total_steps)


@recipe(
    "dynconv",
    paper="Dynamic Convolutions: Exploiting Spatial Sparsity for Faster Inference (CVPR 2020), arXiv:1912.03203",
    budget=BudgetPolicy("trained+calibrated", knob="mask logit offset", reachable=(0.1, 1.0),
                        derives="sparsity_target = budget; per-block bounds start at [budget, budget]",
                        # standard profile, 2026-12-07: trained at 0.5 (92.85 %), calibrated to 0.25: 72.55 %
                        transfers=False),
)  # fmt: skip
def convert(model: nn.Module, config: DynConvConfig, targets: Targets = "auto") -> DynConv:
    """Put a DynConv mask unit on every target residual block of ``model`` (in place)."""
    for name, block, adapter, stages in spatial_targets(model, targets):
        gate = SqueezeMaskUnit(adapter.in_channels(block), chain_stride(stages))
        new = DynConvBlock(block, adapter, stages, gate, execution="pixel")
        new.block_name, new.tau = name, config.tau
        replace_module(model, name, new)
    return DynConv(model, recipe="dynconv", config=copy.copy(config), in_channels=first_conv_in_channels(model))
