"""Channel gating — Hua, Zhou, De Sa, Zhang & Suh, "Channel Gating Neural Networks", NeurIPS 2019.
https://arxiv.org/abs/1805.12549

Each gated convolution splits its input channels into a *base* group (the first ``1 / groups`` of them) and the
rest. The partial sum over the base group, ``p = conv(x_base; W_base)``, is always computed; a gate per output
feature (channel × position) compares the normalised partial sum with a learned per-channel threshold,
``s = [norm(p) > Delta]``, and only where ``s = 1`` is the rest of the sum computed: ``y = p + s · conv(x_rest;
W_rest)``. Training uses the straight-through estimator with the gradient of ``sigmoid((norm(p) - Delta) / tau)``
and a loss that pulls every threshold towards a target ``T`` (the paper's knob for sparsity).

Both convolutions of every basic residual block are gated. Sparse mode computes ``p`` densely and the rest of each
output channel either densely (channels with enough gated-on entries, ``dense_density``; channels with none are
skipped) or at the union of the other channels' gated-on positions by gather-GEMM
(:func:`dynnet.kernels.channel.gated_rest_add_`): a superset of the gated-on entries, reported as the executed
MACs. The exact-MAC kernel (one GEMV per output channel, :func:`dynnet.kernels.channel.gated_rest_conv`) was
10-30× slower than the dense network on CPU.

Departures from the paper:
* by default one decision covers a 4 × 4 window of output positions of one channel (``tile = 4``; the window's
  mean gate logit decides): per-position decisions (``tile = 1``, the paper's) are supported, but with ~10^5
  continuous-threshold decisions per image a few flip between batch sizes (floating-point differences of the
  convolutions at batch 1 vs N), which breaks the library's exact per-sample MAC reproducibility check;
* ``norm`` is a batch norm without affine parameters on the partial sums (running statistics at inference);
* the thresholds start at ``init_threshold = -20`` (every gate open in practice), so a fresh conversion reproduces
  the base network on inputs whose normalised partial sums stay above ``-20``; the paper initialises them for a
  target sparsity;
* besides the target-threshold loss, the library's MAC-budget loss (``budget_weight``) is added;
* the paper's gating is designed for an accelerator; on CPU the fine-grained (channel × tile) decisions cannot be
  executed at full GEMM efficiency, so sparse mode trades extra executed MACs for speed and stays far below the
  realized-speedup goal (see ``docs/recipes/channel.md``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels, residual_blocks
from dynnet.core import (
    Decision,
    DynamicBlock,
    DynamicModel,
    LossOutput,
    RecipeSpec,
    Trace,
    current_trace,
    register_recipe,
    tracing_or_compiling,
    version_key,
)
from dynnet.estimators import straight_through
from dynnet.kernels.channel import ConvSpec, gated_rest_add_
from dynnet.methods.channel._block import check_basic_block

__all__ = ["ChannelGating", "ChannelGatingConfig", "GatedConv", "PartialSumGate"]


@dataclass(frozen=True)
class ChannelGatingConfig:
    """Settings of channel gating.

    Attributes:
        budget: target fraction of dense MACs (MAC-budget loss).
        groups: the base group is ``1 / groups`` of the input channels.
        tau: temperature of the sigmoid whose gradient the straight-through gate uses.
        target_threshold: the threshold ``T`` every gate's ``Delta`` is pulled to.
        threshold_weight: weight of the target-threshold loss ``mean (Delta - T)^2``.
        budget_weight: weight of the MAC-budget loss.
        tile: one decision per output channel and ``tile × tile`` window of positions (the mean gate logit of the
            window); 1 is the paper's per-position gating.
        init_threshold: initial ``Delta`` of every gate (-20: open, the converted network reproduces the base).
    """

    budget: float = 0.5
    groups: int = 4
    tau: float = 1.0
    target_threshold: float = 0.0
    threshold_weight: float = 0.1
    budget_weight: float = 1.0
    tile: int = 4
    init_threshold: float = -20.0


class PartialSumGate(nn.Module):
    """``norm(p) - Delta``: Tensor[N, C_out, H, W] partial sums → gate logits of the same shape."""

    def __init__(self, channels: int, init_threshold: float = -20.0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.threshold = nn.Parameter(torch.full((channels,), float(init_threshold)))

    def forward(self, p: Tensor) -> Tensor:
        return self.norm(p) - self.threshold.view(1, -1, 1, 1)


class GatedConv(DynamicBlock):
    """A convolution whose output features skip the non-base input channels where the gate says so.

    Args:
        conv: the original ``nn.Conv2d`` (groups == 1); its weight and bias are reused under their own names.
        groups: the base group is the first ``ceil(C_in / groups)`` input channels.
        tile: decisions are taken per output channel and ``tile × tile`` window (1: per position, as the paper).
    """

    granularity = "channel"

    def __init__(self, conv: nn.Conv2d, groups: int, tile: int = 1, init_threshold: float = -20.0) -> None:
        super().__init__()
        self.spec = ConvSpec.of(conv)
        # The convolution's own parameters under their own names: state_dict keys stay those of the base network.
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.tile = tile
        self.base = max(1, -(-conv.in_channels // groups))
        if self.base >= conv.in_channels:
            raise ValueError(f"the base group ({self.base}) must be smaller than C_in = {conv.in_channels}")
        self.gate = PartialSumGate(conv.out_channels, init_threshold)
        # Output channels whose kept fraction reaches this run densely in sparse mode, the others by gather-GEMM
        # (see gated_rest_add_). 0, every channel with a kept entry dense, was fastest on the 2-core CPU.
        self.dense_density = 0.0
        self._split_cache: tuple[tuple, tuple[Tensor, Tensor]] | None = None

    def full(self, x: Tensor) -> Tensor:
        """The original convolution."""
        return self.spec.conv(x, self.weight, self.bias)

    def _partial(self, x: Tensor) -> Tensor:
        return self.spec.conv(x[:, : self.base], self._split()[0], self.bias)

    def _rest(self, x: Tensor) -> Tensor:
        return self.spec.conv(x[:, self.base :], self._split()[1])

    def _split(self) -> tuple[Tensor, Tensor]:
        """``(W_base, W_rest)``; without autograd, contiguous copies cached until the weight changes (a strided
        slice would be copied by every convolution call)."""
        w = self.weight
        key = None if torch.is_grad_enabled() or tracing_or_compiling() else version_key(w)
        if key is None:
            return w[:, : self.base], w[:, self.base :]
        cached = self._split_cache
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                cached = (key, (w[:, : self.base].contiguous(), w[:, self.base :].contiguous()))
            self._split_cache = cached
        return cached[1]

    def decide(self, p: Tensor) -> Decision:
        logits = self.gate(p)
        if not self.training and current_trace() is None:
            # Inference with nothing recording the probabilities: the 0/1 decision alone, taken per tile and
            # broadcast by one expand (repeat_interleave twice and a full-resolution sigmoid cost more than the
            # base convolution at batch 1).
            if self.tile == 1:
                return Decision(hard=(logits > 0).to(p.dtype), soft=None, granularity="channel")
            n, c, h, w = logits.shape
            t = self.tile
            on = (F.avg_pool2d(logits, t, ceil_mode=True) > 0).to(p.dtype)  # Tensor[N, C, ceil(h/t), ceil(w/t)]
            th, tw = on.shape[2:]
            hard = on[:, :, :, None, :, None].expand(n, c, th, t, tw, t).reshape(n, c, th * t, tw * t)
            return Decision(hard=hard[:, :, :h, :w], soft=None, granularity="channel")
        if self.tile > 1:  # one decision per (channel, tile × tile window), broadcast to its positions
            h, w = logits.shape[2:]
            pooled = F.avg_pool2d(logits, self.tile, ceil_mode=True)
            logits = pooled.repeat_interleave(self.tile, 2).repeat_interleave(self.tile, 3)[:, :, :h, :w]
        soft = torch.sigmoid(logits / self.tau)
        hard = (logits.detach() > 0).to(p.dtype)
        return Decision(hard=straight_through(hard, soft) if self.training else hard, soft=soft, granularity="channel")

    def forward_dense(self, x: Tensor) -> Tensor:
        return self.full(x)

    def forward_masked(self, x: Tensor) -> Tensor:
        p = self._partial(x)
        d = self.decide(p)
        y = p + d.hard * self._rest(x)
        self._record(x, d, None)
        return y

    def forward_sparse(self, x: Tensor) -> Tensor:
        p = self._partial(x)
        d = self.decide(p)
        y, executed = gated_rest_add_(
            p, x[:, self.base :], self._split()[1], d.hard, self.spec, dense_density=self.dense_density
        )
        self._record(x, d, executed)
        return y

    def _record(self, x: Tensor, d: Decision, executed_entries: Tensor | None) -> None:
        t = current_trace()
        if t is None:
            return
        t.record_decision(self.block_name, d)
        total = self.cost("conv", lambda m, inp: m.full(inp), x)
        base = self.cost("base", lambda m, inp: m._partial(inp), x)
        rest = total - base
        entries = d.hard[0].numel()
        per_entry = rest / entries  # C_rest · k · k: the rest's MACs are linear in the active entries
        macs = base + d.hard.double().flatten(1).sum(1) * per_entry
        executed = total if executed_entries is None else base + executed_entries * per_entry
        t.record_macs(f"{self.block_name}/conv", macs, executed=executed, minimum=base, maximum=total, dense=total)


class ChannelGating(DynamicModel):
    """The converted network; objective: CE + target-threshold loss + MAC budget."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        cfg = self.config
        budget = cfg.budget if budget is None else budget
        task = F.cross_entropy(logits, target)
        thresholds = torch.cat([m.gate.threshold for m in self.modules() if isinstance(m, GatedConv)])
        thr = ((thresholds - cfg.target_threshold) ** 2).mean()
        total = task + cfg.threshold_weight * thr
        parts = {"task": float(task.detach()), "threshold": float(thr.detach())}
        if cfg.budget_weight:
            b = t.budget_loss(budget)
            total = total + cfg.budget_weight * b
            parts["budget"] = float(b.detach())
        return LossOutput(total, parts)


def convert(model: nn.Module, config: ChannelGatingConfig, targets: Targets = "auto") -> ChannelGating:
    """Gate both convolutions of every target basic residual block of ``model`` (in place)."""

    def make(name: str, block: nn.Module, adapter):
        check_basic_block(block)
        for conv_name in ("conv1", "conv2"):
            gated = GatedConv(getattr(block, conv_name), config.groups, config.tile, config.init_threshold)
            gated.block_name, gated.tau = f"{name}.{conv_name}", config.tau
            setattr(block, conv_name, gated)
        return block

    for name, block, adapter in residual_blocks(model, targets):
        make(name, block, adapter)
    return ChannelGating(
        model, recipe="channel_gating", config=copy.copy(config), in_channels=first_conv_in_channels(model)
    )


SPEC = register_recipe(
    RecipeSpec(
        name="channel_gating",
        family="channel",
        config_cls=ChannelGatingConfig,
        convert=convert,
        paper="Channel Gating Neural Networks (NeurIPS 2019), arXiv:1805.12549",
        # Sparse mode computes each output channel densely or at the union of the sparse channels' positions:
        # a superset of the gated entries (reported as executed MACs), for wall-clock speed on CPU.
        exact_executed=False,
    )
)
