"""Instance-wise feature sparsity — Liu, Wang, Han, Xu & Xu, "Learning Instance-wise Sparsity for Accelerating
Deep Models", IJCAI 2019. https://arxiv.org/abs/1907.11840

Training adds an instance-wise l2,1 *feature decay* regulariser on intermediate feature maps, ``lambda · mean_n
sum_c ||h_{n,c}||_2``, so that each instance switches whole channels off. At inference the channels of an
instance's feature map whose l2 norm is below a dynamic threshold (``threshold`` × the instance's mean channel norm)
are eliminated, which accelerates the *subsequent* convolution: here the feature map is the inner one of each
residual block (``relu(bn1(conv1(x)))``), so ``conv1`` runs in full and ``conv2`` reads only the kept channels
(input-side skipping, :func:`dynnet.kernels.channel.sliced_conv_in`).

The decision has no parameters (a deterministic threshold); masked mode (training) applies the same mask so that
the network learns under the pruning it will see at inference.

Departures from the paper:
* the paper selects the layers to accelerate by the coefficient of variation of their sparsity over instances;
  here every target block is pruned, each with its own ``threshold`` buffer (the model's ``scramble_`` randomises
  them; set them per block to emulate the paper's layer selection);
* the regulariser is applied to the inner feature maps of residual blocks and normalised by ``sqrt(H W)``;
* the default ``threshold = 0`` drops only all-zero channels, so a fresh conversion reproduces the base network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels
from dynnet.core import Decision, DynamicModel, LossOutput, RecipeSpec, Trace, current_trace, register_recipe
from dynnet.kernels.channel import GATE_INSTANCE, NativeGate, native_conv3x3_in, sliced_conv_in
from dynnet.losses.instance_sparsity import channel_norms, feature_l21, instance_keep_mask
from dynnet.methods.channel._block import ChannelGatedBlock, convert_blocks

__all__ = ["InstanceSparsity", "InstanceSparsityBlock", "InstanceSparsityConfig", "ThresholdGate"]


@dataclass(frozen=True)
class InstanceSparsityConfig:
    """Settings of instance-wise sparsity.

    Attributes:
        budget: nominal MAC fraction (reported; the trade-off is set by ``threshold`` and ``decay_weight``).
        threshold: initial per-block threshold, relative to the instance's mean channel norm.
        decay_weight: weight of the l2,1 feature-decay regulariser (the paper's lambda).
        strategy: sparse-mode batch strategy.
    """

    budget: float = 0.5
    threshold: float = 0.0
    decay_weight: float = 1e-3
    strategy: str = "auto"


class ThresholdGate(nn.Module):
    """Holds a block's threshold (a buffer, so it is saved) under the decision-module name ``gate``."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold)))


class InstanceSparsityBlock(ChannelGatedBlock):
    """A basic block whose ``conv2`` skips the inner channels each instance made (nearly) zero."""

    def __init__(self, *args, threshold: float = 0.0, decay_weight: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
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
        if t is not None and self.training and self.decay_weight:
            t.add_loss("feature_decay", self.decay_weight * feature_l21(h))
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
        second = self.cost("body", lambda m, inp: m.body(inp), x) - first
        per = second / self.channels  # conv2 MACs per input channel (linear in the channels read)
        macs = first + d.hard.double().sum(1) * per
        executed = first + second if executed_channels is None else first + executed_channels.double() * per
        body = first + second
        t.record_macs(
            f"{self.block_name}/body", macs, executed=executed, minimum=float(first), maximum=body, dense=body
        )


class InstanceSparsity(DynamicModel):
    """The converted network; objective: cross-entropy + the l2,1 feature decay of every block."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        task = F.cross_entropy(logits, target)
        aux = t.aux_loss().to(task.dtype)
        return LossOutput(task + aux, {"task": float(task.detach()), "feature_decay": float(aux.detach())})

    def scramble_(self, generator: torch.Generator) -> int:
        """Give every block a random threshold in [0.2, 1.2) (for the conformance suite); returns the count."""
        n = 0
        for m in self.modules():
            if isinstance(m, InstanceSparsityBlock):
                m.threshold.fill_(0.2 + float(torch.rand((), generator=generator)))
                n += 1
        return n

    def set_threshold(self, threshold: float) -> None:
        """Set the threshold of every block."""
        for m in self.modules():
            if isinstance(m, InstanceSparsityBlock):
                m.threshold.fill_(float(threshold))


def convert(model: nn.Module, config: InstanceSparsityConfig, targets: Targets = "auto") -> InstanceSparsity:
    """Instance-wise inner-channel pruning on every target basic residual block of ``model`` (in place)."""
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


SPEC = register_recipe(
    RecipeSpec(
        name="instance_sparsity",
        family="channel",
        config_cls=InstanceSparsityConfig,
        convert=convert,
        paper="Learning Instance-wise Sparsity for Accelerating Deep Models (IJCAI 2019), arXiv:1907.11840",
    )
)
