"""Dynamic Multi-path — Su, Zhou, Wu, Su, Liang, Liu, Zheng, Wang, Yan & Hu, "Dynamic Multi-path Neural
Network", arXiv 2019. https://arxiv.org/abs/1902.10949

Each residual block is split into ``paths`` parallel sub-layers: path ``p`` is the block's first
convolution restricted to the ``p``-th group of its output channels, followed (after BN and ReLU) by the
second convolution restricted to the same group of *input* channels — the ``p``-th group of the block's inner width
as the channel family defines it (:mod:`dynnet.methods.channel._layout`: a basic block's ``conv1`` outputs, a
Bottleneck's ``conv1`` outputs with ``conv3`` in full, an inverted residual's expanded channels, a ConvNeXt block's
MLP hidden channels). The sum of all paths is exactly the original body, so with every path on the block is the
original block. A gate on the block's input
(global average pool → FC → BN → ReLU → FC, one logit per path, Gumbel-Sigmoid with straight-through
hard decisions) chooses, per sample, which paths run; a block whose paths are all off keeps only its
shortcut (plus the second BN's shift). The objective is cross-entropy plus the global MAC-budget loss.

Execution: masked mode multiplies the hidden channels by the path mask; sparse mode is the channel family's
(:class:`~dynnet.methods.channel.ChannelGatedBlock`, batch norms folded): the samples that chose the same paths run
together on the kept channel groups only (the ``groups`` strategy: at most ``2^P`` slices per block), the compiled
batch-1 path for basic blocks, the dense block when every sample keeps every path.

Departures from the paper:
* the paths are channel groups of the pretrained block (the paper designs the sub-layers and trains from
  scratch), so a converted network starts as the base network (gates open, bias trick);
* the paper's gate sees the previous layer's gate state as well (a recurrent controller); ours sees the
  block input only; decisions use Gumbel-Sigmoid with a MAC-budget loss instead of the paper's
  computation-cost regulariser;
* implemented for the blocks the channel family gates (above); other blocks are left unchanged.

Budget: trained and calibrated. ``budget`` (the target mean fraction of the dense MACs per image) is the target of
the MAC-budget loss; calibration then shifts every path logit of every gate by one offset (``calibration[0]``) until
the mean MAC fraction on held-out images equals the budget.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels, replace_module, residual_blocks
from dynnet.convert.residual import ResidualAdapter
from dynnet.core import Decision, DynamicModel
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.estimators import gumbel_sigmoid
from dynnet.gates import PooledMLPGate
from dynnet.methods.channel import ChannelGatedBlock, describe_block
from dynnet.methods.layer_skip._resnet import LogitEntry, gate_logit_knob

__all__ = ["DynamicMultipath", "DynamicMultipathConfig", "MultiPathBlock"]


@dataclass(frozen=True)
class DynamicMultipathConfig:
    """Settings of Dynamic Multi-path.

    Attributes:
        budget: target mean fraction of the dense MACs per image (gates included): the target of the MAC-budget loss
            and of calibration.
        paths: parallel paths per block (the hidden channels are split into this many groups).
        hidden: hidden width of each gate.
        tau: Gumbel-Sigmoid temperature.
        budget_weight: weight of the MAC-budget loss.
    """

    budget: float = 0.5
    paths: int = 2
    hidden: int = 16
    tau: float = 1.0
    budget_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.paths < 2:
            raise ValueError(f"paths must be >= 2, got {self.paths!r}")


class MultiPathBlock(ChannelGatedBlock):
    """A residual block whose inner width (:mod:`~dynnet.methods.channel._layout`) is split into ``paths`` channel
    groups, each a parallel path gated per sample; the kept paths run channel-sliced like the channel family's
    blocks (the samples that chose the same paths together).

    Args:
        block: the original block (children reused under their own names: ``conv1``, ``bn1``, ...).
        adapter: its residual adapter (shortcut and post-op).
        gate: module mapping the block input Tensor[N, C, H, W] to path logits Tensor[N, P].
        paths: P.
    """

    granularity = "layer"

    def __init__(self, block: nn.Module, adapter: ResidualAdapter, gate: nn.Module, paths: int) -> None:
        super().__init__(block, adapter, gate, strategy="groups")
        bounds = torch.linspace(0, self.channels, paths + 1).round().long().tolist()
        self.groups = [(bounds[i], bounds[i + 1]) for i in range(paths)]

    def path_sizes(self, device: torch.device | str | None = None) -> Tensor:
        """Tensor[P] long: the inner channels of each path."""
        return torch.tensor([hi - lo for lo, hi in self.groups], device=device)

    def open_logits(self) -> list[LogitEntry]:
        """Every path's keep logit is an output of the gate's last linear layer: shift that layer's bias."""
        return [(self.gate.fc2.bias, None, 1.0)]

    def decide(self, x: Tensor) -> tuple[Decision, Tensor]:
        """Per-path decisions Tensor[N, P] and the inner channels' multipliers Tensor[N, C] (each path's decision
        repeated over its channels)."""
        hard, prob = gumbel_sigmoid(self.gate(x), self.tau, hard=True, noise=self.training)
        return Decision(hard, prob, self.granularity), torch.repeat_interleave(hard, self.path_sizes(x.device), dim=1)

    def _decision(self, x: Tensor, decision: Decision | None, scale: Tensor | None) -> tuple[Decision, Tensor]:
        if decision is not None:
            raise ValueError(f"{self.block_name}: dynamic multi-path blocks take their own decisions")
        return self.decide(x)

    def kept_channels(self, d: Decision) -> Tensor:
        """Tensor[N] float64: the inner channels of the paths each sample keeps (``d.hard`` is per path; no matmul,
        which a MAC counter would see)."""
        return (d.hard.double() * self.path_sizes(d.hard.device)).sum(1)


class DynamicMultipath(DynamicModel):
    """The converted network; its objective is the default one (cross-entropy + ``budget_weight`` × MAC budget)."""

    def budget_knob(self) -> Knob:
        """One offset added to every path logit of every gate."""
        return gate_logit_knob(self)


@recipe(
    "dynamic_multipath",
    paper="Dynamic Multi-path Neural Network (arXiv 2019), arXiv:1902.10949",
    budget=BudgetPolicy("trained+calibrated", knob="gate logit offset", reachable=(0.1, 1.0),
                        derives="target of the MAC-budget loss = budget"),
)  # fmt: skip
def convert(model: nn.Module, config: DynamicMultipathConfig, targets: Targets = "auto") -> DynamicMultipath:
    """Split the inner width of every target block of ``model`` that the channel family gates (basic, Bottleneck,
    inverted residual, ConvNeXt) into gated parallel paths (in place); other blocks are left unchanged."""
    converted = 0
    for name, block, adapter in residual_blocks(model, targets):
        layout, _ = describe_block(block)
        if layout is None or layout.channels(block) < config.paths:
            continue
        gate = PooledMLPGate(adapter.in_channels(block), config.paths, config.hidden, open_index=None)
        new = MultiPathBlock(block, adapter, gate, config.paths)
        new.block_name, new.tau = name, config.tau
        replace_module(model, name, new)
        converted += 1
    if not converted:
        raise ValueError(
            "dynamic_multipath splits the inner width of basic residual blocks, Bottlenecks (dense conv2), inverted "
            "residuals or ConvNeXt blocks; none found"
        )
    return DynamicMultipath(
        model, recipe="dynamic_multipath", config=copy.copy(config), in_channels=first_conv_in_channels(model)
    )
