"""Channel gating — Hua, Zhou, De Sa, Zhang & Suh, "Channel Gating Neural Networks", NeurIPS 2019.
https://arxiv.org/abs/1805.12549

Each gated convolution splits its input channels into a *base* group (the first ``1 / groups`` of them) and the
rest. The partial sum over the base group, ``p = conv(x_base; W_base)``, is always computed; a gate per output
feature (channel × position) compares the normalised partial sum with a learned per-channel threshold,
``s = [norm(p) > Delta]``, and only where ``s = 1`` is the rest of the sum computed: ``y = p + s · conv(x_rest;
W_rest)``. Training uses the straight-through estimator with the gradient of ``sigmoid((norm(p) - Delta) / tau)``
and a loss that pulls every threshold towards a target ``T`` (the paper's knob for sparsity).

Both convolutions of every basic residual block are gated (the block is wrapped in a :class:`GatedBasicBlock`).
Sparse mode at batch 1 without a trace runs each block as one compiled call
(:func:`dynnet.kernels.channel.tile_gated_pair_op`): the base partial sums, the tile decisions, the rest only for
each tile's on channels, both batch norms, the shortcut and the ReLU — exactly the gated MACs. A batch without a
trace either runs that compiled loop sample by sample (stem and head batched; ``DynamicModel.batch_engine``, timed
against the batch path) or the batch path: inputs in channels-last memory (oneDNN runs the narrow base and rest
slices 3-4x faster so), decisions at window resolution, the rest of every output channel that some window of the
batch keeps computed densely and multiplied by its windows (:func:`dynnet.kernels.channel.tile_gated_rest_add_`).
Under a trace, the rest of each output channel is computed densely (channels with enough gated-on entries,
``dense_density``; channels with none are skipped) or at the union of the other channels' gated-on positions by
gather-GEMM (:func:`dynnet.kernels.channel.gated_rest_add_`): a superset of the gated-on entries, reported as the
executed MACs. At inference a window is on when its mean partial sum exceeds ``running_mean + Delta ·
sqrt(running_var + eps)`` (``norm(mean) > Delta`` solved for the mean, the compiled call's rule).

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
* the paper's gating is designed for an accelerator; on CPU the batch path trades extra executed MACs for speed
  (see ``docs/recipes/channel.md``), and only the compiled per-sample kernel executes exactly the gated MACs.

Budget: trained and calibrated. ``budget`` is the target fraction of the dense MACs: the target of the MAC-budget
loss (the paper's target threshold ``T`` keeps its own setting, ``target_threshold``); calibration lowers or raises
every gate's threshold ``Delta`` by one offset (``calibration[0]``: ``Delta -= offset``, an in-place edit of the
thresholds that the compiled batch-1 call's plan is keyed on) until the mean MAC fraction on held-out images equals
the budget. Reachable (declared): 0.3 to 1; every gate closed costs 0.29 of a ResNet-8 and 0.26 of a ResNet-20
with ``groups = 4`` (the base groups' partial sums, ``1 / groups`` of each convolution, still run).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.blocks.residual import adopt_children
from dynnet.convert import Targets, first_conv_in_channels, replace_module, residual_blocks
from dynnet.convert.residual import ResidualAdapter, identity_shortcut, post_is_relu
from dynnet.core import (
    Decision,
    DynamicBlock,
    DynamicModel,
    LossOutput,
    Trace,
    current_trace,
    tracing_or_compiling,
    version_key,
)
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.cache import structure_generation
from dynnet.core.recipe import recipe
from dynnet.estimators import straight_through
from dynnet.kernels import native
from dynnet.kernels.channel import (
    TILE,
    ConvSpec,
    gated_rest_add_,
    tile_gated_pair_op,
    tile_gated_rest_add_,
    tiles_on,
    upsample_tiles,
)
from dynnet.methods.channel._block import check_basic_block, folded_projection
from dynnet.methods.channel._layout import describe_block
from dynnet.methods.channel._resnet import compiled_input_ok, resnet_head, resnet_stages, resnet_stem

__all__ = ["ChannelGating", "ChannelGatingConfig", "GatedBasicBlock", "GatedConv", "PartialSumGate"]


@dataclass(frozen=True)
class ChannelGatingConfig:
    """Settings of channel gating.

    Attributes:
        budget: target mean fraction of the dense MACs per image: the MAC-budget loss's target and the
            calibration's.
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
                cl = torch.channels_last  # as the inference inputs (see _eval_layout): oneDNN's fastest pairing
                cached = (
                    key,
                    (w[:, : self.base].contiguous(memory_format=cl), w[:, self.base :].contiguous(memory_format=cl)),
                )
            self._split_cache = cached
        return cached[1]

    def decide(self, p: Tensor) -> Decision:
        if not self.training:
            return self._decide_eval(p)
        logits = self.gate(p)
        if self.tile > 1:  # one decision per (channel, tile × tile window), broadcast to its positions
            h, w = logits.shape[2:]
            pooled = F.avg_pool2d(logits, self.tile, ceil_mode=True)
            logits = pooled.repeat_interleave(self.tile, 2).repeat_interleave(self.tile, 3)[:, :, :h, :w]
        soft = torch.sigmoid(logits / self.tau)
        hard = (logits.detach() > 0).to(p.dtype)
        return Decision(hard=straight_through(hard, soft), soft=soft, granularity="channel")

    def mean_threshold(self) -> Tensor:
        """Tensor[C_out]: the gate's ``norm(m) > Delta`` solved for the window mean ``m`` of the partial sum (with
        the running statistics): ``running_mean + Delta · sqrt(running_var + eps)``, the compiled block's rule."""
        norm = self.gate.norm
        return norm.running_mean + self.gate.threshold * torch.sqrt(norm.running_var + norm.eps)

    def _decide_eval(self, p: Tensor) -> Decision:
        """Inference decisions: a window is on when its mean partial sum exceeds :meth:`mean_threshold` (equal to
        ``mean(norm(p)) > Delta``, evaluated at window resolution, as the compiled batch-1 block does); the
        probability, recorded only under a trace, is ``sigmoid((norm(mean) - Delta) / tau)``."""
        on = tiles_on(p, self.mean_threshold(), self.tile)
        size = p.shape[2:]
        hard = upsample_tiles(on.to(p.dtype), self.tile, size)
        if current_trace() is None:
            return Decision(hard=hard, soft=None, granularity="channel")
        pooled = p if self.tile == 1 else F.avg_pool2d(p, self.tile, ceil_mode=True)
        soft = upsample_tiles(torch.sigmoid(self.gate(pooled) / self.tau), self.tile, size)
        return Decision(hard=hard, soft=soft, granularity="channel")

    def forward_dense(self, x: Tensor) -> Tensor:
        return self.full(x)

    def _eval_layout(self, x: Tensor) -> Tensor:
        """``x`` in channels-last memory at inference: the base and rest slices are narrow (``C_in / groups`` and the
        remainder, e.g. 4 and 12 channels), and oneDNN's NCHW convolutions of such widths ran 3-4x slower than the
        whole convolution on the 2-core CPU (channels-last: about as fast as their MACs). Masked and sparse mode
        share it, so their partial sums, and decisions, are computed alike."""
        return x if self.training else x.contiguous(memory_format=torch.channels_last)

    def forward_masked(self, x: Tensor) -> Tensor:
        x = self._eval_layout(x)
        p = self._partial(x)
        d = self.decide(p)
        y = p + d.hard * self._rest(x)
        self._record(x, d, None)
        return y.contiguous()

    def forward_sparse(self, x: Tensor) -> Tensor:
        x = self._eval_layout(x)
        p = self._partial(x)
        if not self.training and current_trace() is None:  # nothing records: decisions stay per window
            on = tiles_on(p, self.mean_threshold(), self.tile)
            return tile_gated_rest_add_(p, x[:, self.base :], self._split()[1], on, self.tile, self.spec).contiguous()
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


class GatedBasicBlock(nn.Module):
    """A basic residual block whose two convolutions are :class:`GatedConv`; its children keep their names
    (state_dict keys are those of the base network).

    It computes ``post(shortcut(x) + bn2(conv2(relu(bn1(conv1(x))))))`` with the gated convolutions in their own
    modes. For one sample in sparse inference with nothing recording (no trace, gradients, hooks or
    ``force_dense``) and tile 4, the whole block runs as one compiled call
    (:func:`~dynnet.kernels.channel.tile_gated_pair_op`): both base groups, the decisions, the rest of each
    convolution at its on (channel, tile) entries only, both batch norms, the shortcut (a BN-folded 1×1
    projection inside the call) and the ReLU. Its operands are cached as a plan, rebuilt when a source tensor is
    edited in place or re-pointed or a parameter, buffer or module is registered anywhere
    (:func:`~dynnet.core.cache.structure_generation`); the batch norms' ``eps`` is read when it is built.

    Args:
        block: the original block (dynnet CIFAR, torchvision or timm ``BasicBlock``) with gated ``conv1`` and
            ``conv2``.
        adapter: the block's residual adapter (shortcut and post-op).
        act: the name of the activation after ``bn1`` (``relu``; timm's ``act1``).
    """

    def __init__(self, block: nn.Module, adapter: ResidualAdapter, act: str = "relu") -> None:
        super().__init__()
        adopt_children(self, block)
        self.adapter = adapter
        self._act = act  # the activation after bn1: ``relu`` (timm: ``act1``)
        self._plan: tuple | None = None

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_plan"] = None  # holds a compiled-extension object that cannot be copied or pickled; rebuilt on use
        return state

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 1:
            out = self._forward_native(x)
            if out is not None:
                return out
        block = self._block
        return self.adapter.post(block, self.adapter.shortcut(block, x) + self.bn2(self.conv2(self.inner(x))))

    def inner(self, x: Tensor) -> Tensor:
        """``relu(bn1(conv1(x)))``: Tensor[N, C_in, H, W] → Tensor[N, M, H', W']."""
        return self._modules[getattr(self, "_act", "relu")](self.bn1(self.conv1(x)))

    def _forward_native(self, x: Tensor) -> Tensor | None:
        """The block for one sample in one compiled call, or ``None`` when that does not apply."""
        if current_trace() is not None or not compiled_input_ok(x):
            return None
        plan = self.ready_plan()
        return None if plan is None else self.run_plan(plan, x)

    def ready_plan(self) -> tuple | None:
        """The compiled call's plan (rebuilt when stale), or ``None`` when the call may not stand for this block's
        modules now: a gated convolution not in sparse eval mode or with another tile, a submodule in training mode
        or with a forward hook. The caller checks the input (:func:`compiled_input_ok`) and that no trace records."""
        plan = self._plan
        if plan is None or plan[0] != structure_generation() or not plan[1].fresh():
            plan = self._build_plan()
            if plan is None:
                return None
        c1, c2 = plan[5][0], plan[5][1]
        if c1.mode != "sparse" or c2.mode != "sparse" or c1.tile != TILE or c2.tile != TILE:
            return None
        for m in plan[5]:
            if m.training or m._forward_hooks or m._forward_pre_hooks:
                return None
        return plan

    def run_plan(self, plan: tuple, x: Tensor, observed: bool | None = None) -> Tensor:
        """The block on one sample Tensor[1, C_in, H, W] as one compiled call (``plan`` from :meth:`ready_plan`).

        The extension's direct binding skips the dispatcher (~2 µs a call) unless something observes ops at the
        dispatch level (``observed``: a MAC counter or another dispatch mode, the profiler; checked when ``None``),
        which then sees the dispatcher op.
        """
        if observed is None:
            observed = native.observed()
        op = plan[2] if observed else plan[7]
        operands, projection = plan[3], plan[4]
        x = x.contiguous()
        if projection is not None:
            return op(x, *operands, None, *projection)[0]
        residual = x if plan[6] else self.adapter.shortcut(self._block, x).contiguous()
        return op(x, *operands, residual, None, None)[0]

    def _build_plan(self) -> tuple | None:
        """``(generation, stamp, op, operands, projection, modules, identity, direct)``, stored on the block, or
        ``None`` (nothing stored) when the compiled call does not apply: no extension, a post-op other than a ReLU,
        convolutions other than 3×3 / padding 1 (stride 1 or 2, then 1), batch norms without running statistics,
        tensors other than float32 CPU. ``modules`` are the submodules the call stands for (their modes and hooks
        are checked on every call); ``direct`` is the same kernel bound without the dispatcher."""
        self._plan = None
        op = tile_gated_pair_op()
        if op is None or not post_is_relu(self.adapter, self._block):
            return None
        c1, c2, n1, n2 = self.conv1, self.conv2, self.bn1, self.bn2
        if not (isinstance(c1, GatedConv) and isinstance(c2, GatedConv)):
            return None
        if not all(
            isinstance(n, nn.BatchNorm2d) and n.running_var is not None for n in (n1, n2, c1.gate.norm, c2.gate.norm)
        ):
            return None
        if any(c.weight.shape[2:] != (3, 3) or c.spec.padding != (1, 1) or c.spec.dilation != (1, 1) for c in (c1, c2)):
            return None
        stride = c1.spec.stride[0]
        if c1.spec.stride not in ((1, 1), (2, 2)) or c2.spec.stride != (1, 1):
            return None
        generation = structure_generation()
        sources = [
            *(t for c in (c1, c2) for t in (c.weight, c.bias, c.gate.threshold)),
            *(
                t
                for n in (n1, n2, c1.gate.norm, c2.gate.norm)
                for t in (n.weight, n.bias, n.running_mean, n.running_var)
            ),
        ]
        with torch.inference_mode(False), torch.no_grad():
            operands = (*self._conv_operands(c1, n1), *self._conv_operands(c2, n2), stride)
        projection, projection_sources = folded_projection(self.adapter, self._block, c1.spec.stride)
        sources += projection_sources
        tensors = [t for t in (*operands, *(projection or ())) if isinstance(t, Tensor)]
        if not all(t.dtype == torch.float32 and t.is_cpu for t in tensors):
            return None
        sources = [t for t in sources if t is not None]
        if any(t.is_inference() for t in sources):
            return None
        modules = (c1, c2, *(m for m in self.modules() if m is not self and m is not c1 and m is not c2))
        identity = identity_shortcut(self.adapter, self._block)
        direct = native.direct("tile_gated_pair3x3")
        self._plan = (generation, native.load().Stamp(sources), op, operands, projection, modules, identity, direct)
        return self._plan

    @staticmethod
    def _conv_operands(conv: GatedConv, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor, int]:
        """``(w, a, base)`` of one gated convolution: its weight, and ``a`` Tensor[4, C_out] the rows
        ``(b, thr, k, c)``: its bias, the thresholds on the base partial sum's tile mean (the gate's
        ``norm(mean) > Delta`` solved for the mean: ``running_mean + Delta · sqrt(running_var + eps)``) and the
        following batch norm as ``k · y + c``."""
        thr = conv.mean_threshold()
        inv = torch.rsqrt(bn.running_var + bn.eps)
        k = inv if bn.weight is None else bn.weight * inv
        c = -bn.running_mean * k if bn.bias is None else bn.bias - bn.running_mean * k
        b = torch.zeros_like(thr) if conv.bias is None else conv.bias
        rows = torch.stack([b, thr, k, c]).detach().float().contiguous()
        return conv.weight.detach().float().contiguous(), rows, conv.base


class ChannelGating(DynamicModel):
    """The converted network; objective: CE + target-threshold loss + MAC budget.

    Batch-1 sparse inference of a ResNet-style network (``conv1, bn1, layer1.., avgpool, fc``) with nothing recording
    runs its gated blocks as a loop of compiled calls (:meth:`GatedBasicBlock.run_plan`) between the PyTorch stem and
    head, without the blocks' and stages' module calls; a block or stage with a hook, or one the compiled call
    cannot stand for, is called as a module. A batch runs it sample by sample where that is faster than the modules'
    batch path (:attr:`~dynnet.core.DynamicModel.batch_engine`).
    """

    def run(self, x: Tensor) -> Tensor:
        if x.shape[0] == 1 and current_trace() is None and compiled_input_ok(x):
            out = self._run_compiled(x)
            if out is not None:
                return out
        return self.net(x)

    def _each(self, x: Tensor) -> Tensor:
        """The batch sample by sample: the stem and the head batched, the compiled block loop for each sample."""
        if not compiled_input_ok(x[:1]):
            return super()._each(x)
        out = self._run_compiled(x, each=True)
        return super()._each(x) if out is None else out

    def _run_compiled(self, x: Tensor, *, each: bool = False) -> Tensor | None:
        """``stem → blocks → head`` with compiled block calls, or ``None`` (nothing computed) when the network is
        not ResNet-style or has no gated block. ``each``: ``x`` is a batch, each sample goes through the blocks on
        its own (the stem and the head run batched)."""
        blocks = self._compiled_blocks()
        if blocks is None:
            return None
        observed = native.observed()
        h = resnet_stem(self.net, x)
        outs = []
        for hi in h.split(1) if each else (h,):
            for stage, stage_blocks in blocks:
                if stage._forward_hooks or stage._forward_pre_hooks:
                    hi = stage(hi)
                    continue
                for block in stage_blocks:
                    plan = None
                    if isinstance(block, GatedBasicBlock) and not (block._forward_hooks or block._forward_pre_hooks):
                        plan = block.ready_plan()
                    hi = block(hi) if plan is None else block.run_plan(plan, hi, observed)
            outs.append(hi)
        return resnet_head(self.net, outs[0] if len(outs) == 1 else torch.cat(outs))

    def _compiled_blocks(self) -> list[tuple[nn.Module, list[nn.Module]]] | None:
        """The stages and their blocks, cached until a module is registered anywhere; ``None`` when the network is
        not ResNet-style or has no :class:`GatedBasicBlock`."""
        cached = self.__dict__.get("_blocks_cache")
        if cached is not None and cached[0] == structure_generation():
            return cached[1]
        try:
            stages = [(stage, list(stage)) for stage in resnet_stages(self.net)]
        except ValueError:
            stages = None
        if stages is not None and not any(isinstance(b, GatedBasicBlock) for _, blocks in stages for b in blocks):
            stages = None
        self.__dict__["_blocks_cache"] = (structure_generation(), stages)
        return stages

    def budget_knob(self) -> Knob:
        """One offset subtracted from every gate's thresholds ``Delta`` (the gate logit is ``norm(p) - Delta``)."""
        gates = [m.gate.threshold for m in self.modules() if isinstance(m, GatedConv)]
        return self.logit_shift_knob([(threshold, None, -1.0) for threshold in gates], lo=-60.0, hi=60.0)

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


@recipe(
    "channel_gating",
    paper="Channel Gating Neural Networks (NeurIPS 2019), arXiv:1805.12549",
    budget=BudgetPolicy("trained+calibrated", knob="gate threshold offset", reachable=(0.3, 1.0),
                        derives="MAC-budget loss target = budget (the target threshold T stays target_threshold)",
                        # standard profile, 2026-12-07: trained at 0.5 (93.04 %), calibrated to 0.75: 88.79 %
                        transfers=False),
    # Sparse mode computes each output channel densely or at the union of the sparse channels' positions:
    # a superset of the gated entries (reported as executed MACs), for wall-clock speed on CPU.
    exact_executed=False,
)  # fmt: skip
def convert(model: nn.Module, config: ChannelGatingConfig, targets: Targets = "auto") -> ChannelGating:
    """Gate both convolutions of every target basic residual block of ``model`` (in place)."""

    for name, block, adapter in residual_blocks(model, targets):
        layout, _ = describe_block(block)
        act = layout.head[0].act if layout is not None and layout.kind == "basic" else None
        check_basic_block(block, act or "relu")
        for conv_name in ("conv1", "conv2"):
            gated = GatedConv(getattr(block, conv_name), config.groups, config.tile, config.init_threshold)
            gated.block_name, gated.tau = f"{name}.{conv_name}", config.tau
            setattr(block, conv_name, gated)
        replace_module(model, name, GatedBasicBlock(block, adapter, act or "relu"))
    return ChannelGating(
        model, recipe="channel_gating", config=copy.copy(config), in_channels=first_conv_in_channels(model)
    )
