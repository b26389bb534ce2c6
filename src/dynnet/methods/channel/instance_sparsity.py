"""Instance-wise feature sparsity — Liu, Wang, Han, Xu & Xu, "Learning Instance-wise Sparsity for Accelerating
Deep Models", IJCAI 2019. https://arxiv.org/abs/1907.11840

Training adds an instance-wise l2,1 *feature decay* regulariser on intermediate feature maps, ``lambda · mean_n
sum_c ||h_{n,c}||_2``, so that each instance switches whole channels off. At inference the channels of an
instance's feature map whose l2 norm is below a dynamic threshold (``threshold`` × the instance's mean channel norm)
are eliminated, which accelerates the *subsequent* convolution: here the feature map is the inner one of each
residual block (``relu(bn1(conv1(x)))``), so ``conv1`` runs in full and ``conv2`` reads only the kept channels
(input-side skipping, :func:`dynnet.kernels.channel.sliced_conv_in`). In a Bottleneck the same (``conv3`` runs in
full); in an inverted residual the expansion and depthwise convolution run in full and the projection reads only
the kept expanded channels (:mod:`~dynnet.methods.channel._layout`).

The decision has no parameters (a deterministic threshold); masked mode (training) applies the same mask so that
the network learns under the pruning it will see at inference.

Departures from the paper:
* the paper selects the layers to accelerate by the coefficient of variation of their sparsity over instances;
  here every target block is pruned, each with its own ``threshold`` buffer (the model's randomiser redraws
  them; set them per block to emulate the paper's layer selection);
* the regulariser is applied to the inner feature maps of residual blocks and normalised by ``sqrt(H W)``;
* the regulariser is *trimmed* by the budget: per instance it decays only the channels outside the ``round(ρ · C)``
  of largest norm, ``ρ`` the kept-channel rate at which the network spends the budget (below); at ``ρ = 0`` it is
  the paper's l2,1 decay of every channel, at a budget of 1 it is off. The channels the budget will cut are the ones
  driven to zero, so that cutting them at inference costs little;
* the default ``threshold = 0`` drops only all-zero channels, so a fresh conversion reproduces the base network.

Budget: trained and calibrated. ``budget`` is the target fraction of the dense MACs. Training derives ``ρ`` from it —
``(budget·D − min) / (max − min)`` from the trace's MAC bounds: ``conv1`` and the static part always run — and trims
the feature decay with it (above); calibration then sets one threshold for every block (the ``gate.threshold``
buffers, which the compiled batch-1 call's plan is keyed on; the MACs fall as it rises) until the mean MAC fraction
on held-out images equals the budget, as the paper sets its threshold after training. Reachable (declared): 0.5
to 1; ``conv2`` reading no channel costs 0.43 of a ResNet-8 and 0.48 of a ResNet-20 (``conv1``, the stem, the
shortcuts and the head still run).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels
from dynnet.core import Decision, DynamicModel, LossOutput, Trace, current_trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.kernels.channel import GATE_INSTANCE, NativeGate, native_conv3x3_in, sliced_conv_in
from dynnet.losses.instance_sparsity import channel_norms, instance_keep_mask
from dynnet.methods.channel._block import ChannelGatedBlock, convert_blocks
from dynnet.methods.channel._budget import variable_rate
from dynnet.testing.scramble import register_randomiser

__all__ = ["InstanceSparsity", "InstanceSparsityBlock", "InstanceSparsityConfig", "ThresholdGate"]


@dataclass(frozen=True)
class InstanceSparsityConfig:
    """Settings of instance-wise sparsity.

    Attributes:
        budget: target mean fraction of the dense MACs per image: training trims the feature decay to the channels
            it cuts, and calibration sets the threshold that spends it.
        threshold: initial per-block threshold, relative to the instance's mean channel norm (0: the base network);
            :func:`dynnet.calibrate` sets it from ``budget``.
        decay_weight: weight of the l2,1 feature-decay regulariser (the paper's lambda).
        strategy: sparse-mode batch strategy.
    """

    budget: float = 0.75
    threshold: float = 0.0
    decay_weight: float = 1e-3
    strategy: str = "auto"


class ThresholdGate(nn.Module):
    """Holds a block's threshold (a buffer, so it is saved) under the decision-module name ``gate``."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold)))


class InstanceSparsityBlock(ChannelGatedBlock):
    """A block whose gated channels are computed in full and read only where the instance made them non-zero (basic
    block: ``conv2`` skips the inner channels; Bottleneck: ``conv2`` too, ``conv3`` runs in full; inverted residual:
    the projection skips the expanded channels)."""

    def __init__(self, *args, threshold: float = 0.0, decay_weight: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.layout.kind == "mlp":
            raise ValueError(
                "instance sparsity gates residual blocks and inverted residuals; a ConvNeXt block's MLP is not "
                "supported"
            )
        if self.layout.se is not None:
            raise ValueError(
                "instance sparsity reads the expanded channels an image left non-zero, but this inverted residual "
                "rescales them first with a squeeze-excitation (MobileNetV3, EfficientNet) that pools all of them: "
                "supported are blocks without one (ResNet, MobileNetV2)"
            )
        self.gate = ThresholdGate(threshold)
        self.decay_weight = decay_weight

    @property
    def threshold(self) -> Tensor:
        return self.gate.threshold

    def _mask(self, h: Tensor) -> tuple[Decision, Tensor]:
        norms = channel_norms(h.detach())
        keep = instance_keep_mask(norms, self.threshold)
        hard = keep.to(h.dtype)
        return Decision(hard=hard, soft=None, granularity="channel"), hard

    def forward_masked(self, x: Tensor, decision: Decision | None = None, scale: Tensor | None = None) -> Tensor:
        h = self.inner(x)
        d, s = self._mask(h)
        t = current_trace()
        if t is not None and self.training and self.decay_weight:  # the model's objective trims and weighs them
            t.record_output(f"{self.block_name}/channel_norms", channel_norms(h))
        out = self.post(self.shortcut(x) + self.outer(h * s[:, :, None, None]))
        self._record_in(x, d, executed_channels=None)
        return out

    def native_gate(self) -> NativeGate | None:
        threshold = self.gate.threshold
        ratio = threshold.reshape(1)
        return NativeGate(GATE_INSTANCE, ratio, ratio, ratio, ratio, 0, (threshold,))

    def forward_sparse(self, x: Tensor, decision: Decision | None = None, scale: Tensor | None = None) -> Tensor:
        if x.shape[0] == 1 and decision is None and current_trace() is None:
            out = self._forward_native(x)  # conv1, the norms, the decision and conv2 in one compiled call
            if out is not None:
                return out
        if self.layout.kind != "basic":  # the gated channels in full, then only the kept ones read
            h = self.inner(x)
            d, s = self._mask(h)
            y, executed = self.layout.sparse_tail(self, self.folded_layout(), h, s > 0, self.strategy)
            out = self.post(self.shortcut(x) + y)
            self._record_in(x, d, executed_channels=executed)
            return out
        w1, b1, w2, b2, spec1, spec2 = self.folded_weights()
        fast = native_conv3x3_in(x, w1, b1, None, spec1)  # batch 1 on the compiled kernel, else None
        h = (spec1.conv(x, w1, b1) if fast is None else fast[0]).relu_()
        d, s = self._mask(h)
        y, executed = sliced_conv_in(h, w2, b2, s > 0, spec2, strategy=self.strategy)
        out = self.post(self.shortcut(x) + y)
        self._record_in(x, d, executed_channels=executed)
        return out

    def _record_in(self, x: Tensor, d: Decision, executed_channels: Tensor | None) -> None:
        t = current_trace()
        if t is None:
            return
        t.record_decision(self.block_name, d)
        first = self.cost("conv1", lambda m, inp: m.inner(inp), x)
        second = self.cost("gated", lambda m, inp: m.gated_body(inp), x) - first
        body = self.cost("body", lambda m, inp: m.body(inp), x)
        fixed = body - second  # what runs whatever is kept: the gated channels, a Bottleneck's conv3
        per = second / self.channels  # MACs of the reading convolution per input channel (linear in those read)
        macs = fixed + d.hard.double().sum(1) * per
        executed = body if executed_channels is None else fixed + executed_channels.double() * per
        t.record_macs(
            f"{self.block_name}/body", macs, executed=executed, minimum=float(fixed), maximum=body, dense=body
        )


class InstanceSparsity(DynamicModel):
    """The converted network; objective: cross-entropy + the budget-trimmed l2,1 feature decay of every block."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        budget = self.config.budget if budget is None else budget
        task = F.cross_entropy(logits, target)
        rate = variable_rate(t, budget)  # the kept-channel rate that spends the budget
        decay = task.new_zeros(())
        for block in self.sparsity_blocks():
            norms = t.outputs.get(f"{block.block_name}/channel_norms")
            if norms is None:
                continue
            kept = round(rate * norms.shape[1])  # per instance, the largest norms are spared
            trimmed = norms.sort(1, descending=True).values[:, kept:]
            decay = decay + block.decay_weight * trimmed.sum(1).mean().to(task.dtype)
        total = task + decay
        parts = {"task": float(task.detach()), "feature_decay": float(decay.detach())}
        if t.losses:
            aux = t.aux_loss().to(task.dtype)
            total = total + aux
            parts["aux"] = float(aux.detach())
        return LossOutput(total, parts)

    def sparsity_blocks(self) -> list[InstanceSparsityBlock]:
        """The pruned blocks, in execution order."""
        return [m for m in self.modules() if isinstance(m, InstanceSparsityBlock)]

    def budget_knob(self) -> Knob:
        """One threshold for every block (the MACs fall as it rises; at ``C`` no channel is kept)."""
        blocks = self.sparsity_blocks()
        hi = float(max(b.channels for b in blocks))
        return Knob("instance threshold", lambda: float(blocks[0].threshold), self.set_threshold, 0.0, hi, False)

    def set_threshold(self, threshold: float) -> None:
        """Set the threshold of every block (in place: the compiled batch-1 call's plan is rebuilt)."""
        with torch.no_grad():
            for m in self.sparsity_blocks():
                m.threshold.fill_(float(threshold))


@recipe(
    "instance_sparsity",
    paper="Learning Instance-wise Sparsity for Accelerating Deep Models (IJCAI 2019), arXiv:1907.11840",
    budget=BudgetPolicy("trained+calibrated", knob="instance threshold", reachable=(0.5, 1.0),
                        derives="feature decay trimmed to the channels beyond the kept-channel rate that spends the "
                        "budget; the threshold is calibrated",
                        # standard profile, 2026-12-07: trained at 0.5 (82.50 %), calibrated to 0.75: 52.32 %
                        transfers=False),
)  # fmt: skip
def convert(model: nn.Module, config: InstanceSparsityConfig, targets: Targets = "auto") -> InstanceSparsity:
    """Instance-wise inner-channel pruning on every target residual block of ``model`` (in place): basic blocks,
    Bottlenecks and inverted residuals."""
    convert_blocks(
        model,
        targets,
        lambda n, b, a: InstanceSparsityBlock(
            b, a, None, strategy=config.strategy, threshold=config.threshold, decay_weight=config.decay_weight
        ),
    )
    return InstanceSparsity(
        model, recipe="instance_sparsity", config=copy.copy(config), in_channels=first_conv_in_channels(model)
    )


@register_randomiser(InstanceSparsity)
def _randomise(model: InstanceSparsity, generator: torch.Generator) -> int:
    """Give every block a random threshold in [0.2, 1.2) (for the conformance suite); returns the count."""
    n = 0
    for m in model.modules():
        if isinstance(m, InstanceSparsityBlock):
            m.threshold.fill_(0.2 + float(torch.rand((), generator=generator)))
            n += 1
    return n
