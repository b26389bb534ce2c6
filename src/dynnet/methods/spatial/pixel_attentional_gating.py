"""Pixel-wise Attentional Gating — Kong & Fowlkes, "Pixel-wise Attentional Gating for Scene Parsing", WACV 2019.
https://openaccess.thecvf.com/content_WACV_2019/html/Kong_Pixel-Wise_Attentional_Gating_for_Scene_Parsing_WACV_2019_paper.html
(arXiv:1805.01556).

PAG attaches to each residual block a small gating branch (3×3 conv → BN → ReLU → 1×1 conv) that outputs,
per pixel, a categorical choice sampled with Gumbel-Softmax (hard, straight-through); for "parsimonious
inference" the choice is binary: compute the block's residual branch at this pixel or not, so the
block computes ``out = post(shortcut(x) + G ⊙ branch(x))`` and skipped pixels keep the shortcut. Sparse
mode runs the branch only at the gated pixels (first convolution on the dilated mask, gather → GEMM →
scatter, :mod:`dynnet.kernels.spatial`), with the gating branch's MACs counted.

Objective: cross-entropy + ``rate_weight`` × the per-block sparsity term ``mean_g (rate_g - r)^2`` (each
block's fraction of active pixels is pulled to the target rate ``r``) + ``budget_weight`` × the global MAC-budget
term.

Departures from the paper:
* only the binary "compute / skip" use of PAG is implemented; PAG's per-pixel choice among pooling sizes
  (a categorical gate over dilated branches) is not;
* the paper's sparsity regulariser constrains the fraction of active pixels per layer with a KL term to
  a target; here a squared deviation of each block's active-pixel rate from the target (ConvNet-AIG's
  target-rate form) plus the global MAC budget;
* gates start open (bias trick) so a fresh conversion reproduces the base network; classification
  networks instead of the paper's scene-parsing ones.

Budget: trained and calibrated. ``budget`` is the target fraction of the dense MACs (gating branches included:
a 16-wide 3×3 gating branch costs about a quarter of a CIFAR ResNet). The paper's knob, the target fraction of
active pixels per block ``r`` (``pixel_rate``), is derived from it at every step unless set: the rate at which the
blocks' branches, scaling linearly with their active pixels, bring the whole network to the budget
(:func:`~dynnet.methods.spatial._common.rate_for_budget`); the global MAC-budget term pulls to the budget itself.
Calibration then adds one offset to the "compute" logit of every gate (``conv2.bias[1]``; kept in
``calibration[0]``) until the mean MAC fraction on held-out images equals the budget. Reachable: 0.35–1.0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.blocks import SpatialResidual
from dynnet.convert import Targets, first_conv_in_channels, replace_module
from dynnet.core import Decision, DynamicModel, LossOutput, Trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.estimators import gumbel_softmax
from dynnet.losses import mac_budget_loss, target_rate_loss
from dynnet.methods.spatial._common import chain_stride, rate_for_budget, spatial_targets
from dynnet.methods.spatial.gates import PixelGateUnit

__all__ = ["PAGBlock", "PixelAttentionalGating", "PixelAttentionalGatingConfig"]


@dataclass(frozen=True)
class PixelAttentionalGatingConfig:
    """Settings of PAG.

    Attributes:
        budget: target mean fraction of the dense MACs per image, gating branches included; the target of the
            global MAC-budget term, and what the per-block pixel rate is derived from.
        pixel_rate: the paper's target fraction of active pixels per block; ``None`` (default): derived from
            ``budget`` at every step (the rate at which the branches bring the network to the budget).
        hidden: width of the gating branch's hidden layer.
        tau: Gumbel-Softmax temperature.
        rate_weight: weight of the per-block sparsity term.
        budget_weight: weight of the global MAC-budget term.
    """

    budget: float = 0.5
    pixel_rate: float | None = None
    hidden: int = 16
    tau: float = 1.0
    rate_weight: float = 2.0
    budget_weight: float = 2.0

    def __post_init__(self) -> None:
        if self.pixel_rate is not None and not 0.0 < self.pixel_rate <= 1.0:
            raise ValueError(f"pixel_rate must be a fraction in (0, 1] or None, got {self.pixel_rate}")


class PAGBlock(SpatialResidual):
    """A residual block with a pixel-wise attentional gate; decisions are Tensor[N, H_out, W_out] of 0/1."""

    granularity = "spatial"

    def decide(self, x: Tensor) -> Decision:
        sample, probs = gumbel_softmax(self.gate(x), self.tau, hard=True, noise=self.training)
        return Decision(hard=sample[..., 1], soft=probs[..., 1], granularity="spatial")


class PixelAttentionalGating(DynamicModel):
    """The converted network: cross-entropy + per-block active-pixel rate + global MAC budget."""

    def budget_knob(self) -> Knob:
        """One offset added to the "compute" logit of every gate (``conv2.bias[1]``)."""
        return self.logit_shift_knob([(b.gate.conv2.bias, 1, 1.0) for _, b in self.blocks()])

    def pixel_rate(self, t: Trace, budget: float | None = None) -> float:
        """The target fraction of active pixels per block: ``config.pixel_rate``, or derived from the budget."""
        if self.config.pixel_rate is not None:
            return self.config.pixel_rate
        budget = self.config.budget if budget is None else budget
        return rate_for_budget(t, budget, lambda name: name.endswith("/body"))

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        budget = self.config.budget if budget is None else budget
        task = F.cross_entropy(logits, target)
        decisions = list(t.decisions_of("spatial").values())
        rate = target_rate_loss(decisions, self.pixel_rate(t, budget)) / len(decisions)
        macs = mac_budget_loss(t.macs(), t.dense_macs(), budget)
        total = task + self.config.rate_weight * rate + self.config.budget_weight * macs
        parts = {"task": float(task.detach()), "rate": float(rate.detach()), "budget": float(macs.detach())}
        return LossOutput(total, parts)


@recipe(
    "pixel_attentional_gating",
    paper="Pixel-wise Attentional Gating for Scene Parsing (WACV 2019), arXiv:1805.01556",
    budget=BudgetPolicy("trained+calibrated", knob="gate logit offset", reachable=(0.35, 1.0),
                        derives="per-block target pixel rate = the rate at which the branches spend the budget",
                        # standard profile, 2026-12-07: trained at 0.5 (91.47 %), calibrated to 0.75: 13.68 %
                        transfers=False),
)  # fmt: skip
def convert(
    model: nn.Module, config: PixelAttentionalGatingConfig, targets: Targets = "auto"
) -> PixelAttentionalGating:
    """Put a pixel-wise attentional gate on every target residual block of ``model`` (in place)."""
    for name, block, adapter, stages in spatial_targets(model, targets):
        gate = PixelGateUnit(adapter.in_channels(block), chain_stride(stages), config.hidden)
        new = PAGBlock(block, adapter, stages, gate, execution="pixel")
        new.block_name, new.tau = name, config.tau
        replace_module(model, name, new)
    return PixelAttentionalGating(
        model, recipe="pixel_attentional_gating", config=copy.copy(config), in_channels=first_conv_in_channels(model)
    )
