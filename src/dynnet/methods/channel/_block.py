"""`ChannelGatedBlock`: a residual block whose inner channels are switched per input.

The gated channels are one *inner* width of the block (:mod:`~dynnet.methods.channel._layout`): in a basic residual
block the outputs of ``conv1``, which are the inputs of ``conv2``; in a Bottleneck the same (``conv3`` runs in
full); in an inverted residual the expanded channels (expansion, depthwise and projection all sliced). Switching
channel ``c`` off for a sample removes ``1 / C`` of ``conv1``'s MACs (one output channel fewer) and ``1 / C`` of
``conv2``'s (one input channel fewer) while the block's output width, and so the residual stream, is unchanged.

* masked mode: ``post(shortcut(x) + bn2(conv2(relu(bn1(conv1(x))) * scale)))`` with ``scale`` Tensor[N, C]
  (the straight-through decision, or the decision times a boosting factor for FBS-style recipes);
* sparse mode: the batch norms are folded into the convolutions and
  :func:`dynnet.kernels.channel.sliced_pair` (basic blocks, Bottlenecks) or
  :func:`~dynnet.kernels.channel.sliced_expanded` (inverted residuals) computes only the kept channels of each
  sample. The folded weights are cached until a convolution or batch-norm tensor is replaced or edited in place
  (:meth:`folded_weights`, :meth:`folded_layout`), and a basic block at batch 1 takes
  :func:`~dynnet.kernels.channel.sliced_pair_single` (one ``nonzero``, no strategy choice) or the compiled gated
  pair; the other kinds run PyTorch slices only;
* dense mode: the original block.

The per-sample MACs of the branch are ``fixed + k_n · per`` where ``per`` is the probed cost of the part linear in
the inner width over ``C`` and ``fixed`` the rest (0 for basic blocks and inverted residuals, ``conv3`` for a
Bottleneck), so this is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dynnet.blocks.residual import adopt_children
from dynnet.convert import Targets, replace_module, residual_blocks
from dynnet.convert.residual import ResidualAdapter, identity_shortcut, post_is_relu, projection_shortcut
from dynnet.core import Decision, DynamicBlock, current_trace, tracing_or_compiling, version_key
from dynnet.core.cache import structure_generation
from dynnet.kernels import native
from dynnet.kernels.channel import (
    GATE_GIVEN,
    ConvSpec,
    NativeGate,
    fold_bn,
    gated_pair_plan,
    native_pair_usable,
    sliced_pair,
    sliced_pair_single,
)
from dynnet.methods.channel._layout import LAYOUTS, gated_layout

__all__ = ["ChannelGatedBlock", "check_basic_block", "convert_blocks", "folded_projection", "gated_channels"]


def folded_projection(
    adapter: ResidualAdapter, block: nn.Module, stride: tuple[int, ...]
) -> tuple[tuple[Tensor, Tensor] | None, list[Tensor | None]]:
    """The block's 1×1 projection shortcut with its batch norm folded, for a compiled block call that computes it:
    ``((w Tensor[C_out, C_in], b Tensor[C_out]), sources)`` with ``sources`` the tensors it derives from (for the
    plan's ``Stamp``), or ``(None, [])`` when the shortcut is not such a projection or has another stride."""
    shortcut = projection_shortcut(adapter, block)
    if shortcut is None or shortcut[0].stride != stride:
        return None, []
    conv, bn = shortcut
    with torch.inference_mode(False), torch.no_grad():
        w, b = fold_bn(conv, bn)
        projection = (w.reshape(w.shape[0], -1).contiguous(), b.contiguous())
    return projection, [conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]


def gated_channels(block: nn.Module) -> int:
    """The gated inner width of a block a :class:`ChannelGatedBlock` can wrap (raises on any other block)."""
    return gated_layout(block).channels(block)


def check_basic_block(block: nn.Module, act: str = "relu") -> None:
    """Raise unless ``block`` is a basic residual block (``conv1 → bn1 → act → conv2 → bn2``; ``act`` is ``relu``,
    timm's ``act1``)."""
    needed = ("conv1", "bn1", "conv2", "bn2", act)
    missing = [a for a in needed if not hasattr(block, a)]
    if missing or hasattr(block, "conv3"):
        why = f"lacks {missing}" if missing else "is a bottleneck (conv3)"
        raise ValueError(
            f"channel gating needs basic residual blocks (conv1, bn1, relu, conv2, bn2); {type(block).__name__} {why}"
        )
    for name in ("conv1", "conv2"):
        ConvSpec.of(getattr(block, name))  # raises on grouped convolutions


class ChannelGatedBlock(DynamicBlock):
    """Wraps a residual block (basic, Bottleneck or inverted residual); its children keep their names.

    Args:
        block: the original block (dynnet CIFAR or torchvision ``BasicBlock``, torchvision ``Bottleneck`` or
            ``InvertedResidual``: :data:`~dynnet.methods.channel._layout.LAYOUTS`); its submodules are reused.
        adapter: the block's residual adapter (shortcut and post-op).
        gate: module producing the decision from the block input, or ``None`` when decisions come from outside
            (a recurrent controller or a separate gater network passes them to :meth:`forward`).
        strategy: sparse-mode batch strategy (see :mod:`dynnet.kernels.channel`).

    Subclasses with their own gate implement :meth:`decide`; those that run only some block kinds narrow
    ``supported_layouts``.
    """

    granularity = "channel"
    supported_layouts: tuple[str, ...] = LAYOUTS

    def __init__(
        self, block: nn.Module, adapter: ResidualAdapter, gate: nn.Module | None, strategy: str = "auto"
    ) -> None:
        super().__init__()
        layout = gated_layout(block, self.supported_layouts)
        if layout.kind == "basic":
            check_basic_block(block, layout.head[0].act or "relu")
        adopt_children(self, block)
        self.layout = layout
        self._act = layout.head[0].act if layout.kind == "basic" else None  # ``relu`` (timm's ``act1``)
        self._folded: tuple[tuple, tuple] | None = None
        self._fused_post: bool | None = None  # whether the adapter's post is a plain ReLU (set on first use)
        self._plan: tuple | None = None  # the batch-1 compiled call's operands (_build_plan)
        self.adapter = adapter
        self.strategy = strategy
        if gate is not None:
            self.gate = gate

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_plan"] = None  # holds a compiled-extension object that cannot be copied or pickled; rebuilt on use
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "layout" not in self.__dict__:  # pickled before the layouts existed: a basic block then
            self.layout = gated_layout(self, ("basic",))
        if "_act" not in self.__dict__:  # pickled before timm blocks were gated
            self._act = self.layout.head[0].act

    @property
    def channels(self) -> int:
        """C: the number of gated inner channels."""
        if self.layout.kind == "basic":
            return self.conv1.out_channels
        return self.layout.channels(self)

    def channel_importance(self) -> Tensor:
        """A data-free estimate of each inner channel's contribution to the block output: Tensor[C], non-negative
        (:meth:`GatedLayout.importance <dynnet.methods.channel._layout.GatedLayout.importance>`). It ranks channels
        like the criterion of the structured-pruning baseline (the L1 norm of a channel's weights) but sees the
        trained batch norms too, so that gates can start where static pruning would cut
        (:meth:`FBS <dynnet.methods.channel.fbs.FBS>` keeps the most important channels before its predictor has
        learned anything)."""
        return self.layout.importance(self)

    # -- pieces ---------------------------------------------------------------------------------
    def inner(self, x: Tensor) -> Tensor:
        """The gated channels (basic block: ``relu(bn1(conv1(x)))``): Tensor[N, C_in, H, W] → Tensor[N, C, H', W']."""
        if self.layout.kind == "basic":
            return self._modules[self._act](self.bn1(self.conv1(x)))
        return self.layout.inner(self, x)

    def outer(self, h: Tensor) -> Tensor:
        """What reads them (basic block: ``bn2(conv2(h))``): Tensor[N, C, H', W'] → Tensor[N, C_out, H'', W'']."""
        if self.layout.kind == "basic":
            return self.bn2(self.conv2(h))
        return self.layout.outer(self, h)

    def body(self, x: Tensor) -> Tensor:
        return self.outer(self.inner(x))

    def gated_body(self, x: Tensor) -> Tensor:
        """The part of the branch whose MACs are linear in the kept channels (the whole branch but a Bottleneck's
        ``conv3``): Tensor[N, C_in, H, W] → Tensor[N, ·, H', W'] (only its cost is read)."""
        if self.layout.kind == "basic":
            return self.body(x)
        return self.layout.gated(self, x)

    def shortcut(self, x: Tensor) -> Tensor:
        return self.adapter.shortcut(self._block, x)

    def post(self, y: Tensor) -> Tensor:
        return self.adapter.post(self._block, y)

    def decide(self, x: Tensor) -> tuple[Decision, Tensor]:
        """Decision for the block input Tensor[N, C_in, H, W].

        Returns:
            ``(decision, scale)``: ``decision.hard`` Tensor[N, C] of 0/1 (straight-through in training) and the
            channel multipliers ``scale`` Tensor[N, C] (zero exactly where the decision is off).
        """
        raise NotImplementedError

    def sparse_scale(self, x: Tensor) -> Tensor:
        """Channel multipliers for sparse inference when no trace records the decision: Tensor[N, C] whose
        non-zero entries are exactly the kept channels. When :meth:`binary_scale` is true only the positions of
        the non-zeros matter (subclasses return e.g. ``relu(logits)`` and save the 0/1 conversion, a few
        microseconds per block that count at batch 1); otherwise the values are the multipliers."""
        return self.decide(x)[1]

    def binary_scale(self) -> bool:
        """Whether ``scale`` only takes the values 0 and 1 (sparse mode then skips the multiplication)."""
        return True

    # -- modes ----------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor, decision: Decision | None = None, scale: Tensor | None = None) -> Tensor:
        return self.post(self.shortcut(x) + self.body(x))

    def forward_masked(self, x: Tensor, decision: Decision | None = None, scale: Tensor | None = None) -> Tensor:
        d, s = self._decision(x, decision, scale)
        h = self.inner(x) * s.to(x.dtype)[:, :, None, None]
        out = self.post(self.shortcut(x) + self.outer(h))
        self._record(x, d, executed_channels=None)
        return out

    def forward_sparse(self, x: Tensor, decision: Decision | None = None, scale: Tensor | None = None) -> Tensor:
        if self.layout.kind != "basic":
            return self._forward_sparse_layout(x, decision, scale)
        t = current_trace()
        single = x.shape[0] == 1 and self.strategy in ("auto", "groups", "per_sample")
        if single and t is None:  # batch-1 inference: the whole block (and its decision) in one compiled call
            out = self._forward_native(x, decision, scale)
            if out is not None:
                return out
        if decision is None and t is None:  # nothing records the decision: only the kept channels are needed
            d, s = None, self.sparse_scale(x)
        else:
            d, s = self._decision(x, decision, scale)
        w1, b1, w2, b2, spec1, spec2 = self.folded_weights()
        if single:
            if self._post_is_relu():  # the shortcut, the addition and the ReLU in the kernel's epilogue
                out, k = sliced_pair_single(
                    x, w1, b1, w2, b2, s.to(x.dtype), spec1, spec2, binary=self.binary_scale(),
                    residual=self.shortcut(x), relu=True,
                )  # fmt: skip
            else:
                y, k = sliced_pair_single(x, w1, b1, w2, b2, s.to(x.dtype), spec1, spec2, binary=self.binary_scale())
                out = self.post(self.shortcut(x) + y)
            executed = None if t is None else torch.full((1,), float(k), dtype=torch.float64, device=x.device)
        else:
            y, executed = sliced_pair(
                x, w1, b1, w2, b2, s.to(x.dtype), spec1, spec2, binary=self.binary_scale(), strategy=self.strategy
            )
            out = self.post(self.shortcut(x) + y)
        if t is not None:
            self._record(x, d, executed_channels=executed)
        return out

    def _forward_sparse_layout(self, x: Tensor, decision: Decision | None, scale: Tensor | None) -> Tensor:
        """Sparse mode of a Bottleneck or an inverted residual: PyTorch slices of the BN-folded convolutions
        (:meth:`~dynnet.methods.channel._layout.GatedLayout.sparse_branch`), every batch size."""
        t = current_trace()
        if decision is None and t is None:
            d, s = None, self.sparse_scale(x)
        else:
            d, s = self._decision(x, decision, scale)
        folded = self.folded_layout()
        binary = self.binary_scale()
        y, executed = self.layout.sparse_branch(self, folded, x, s.to(x.dtype), binary, self.strategy)
        out = self.post(self.shortcut(x) + y)
        if t is not None:
            self._record(x, d, executed_channels=executed)
        return out

    def folded_layout(self) -> tuple:
        """:meth:`~dynnet.methods.channel._layout.GatedLayout.fold` of a Bottleneck or inverted residual, cached
        like :meth:`folded_weights` (recomputed with gradients enabled or under tracing)."""
        layout = self.layout
        key = None
        if not (torch.is_grad_enabled() or tracing_or_compiling()):
            versions = version_key(*layout.sources(self))
            key = None if versions is None else (*versions, layout.eps(self))
        if key is None:
            return layout.fold(self)
        folded = self._folded
        if folded is not None and folded[0] == key:
            return folded[1]
        with torch.inference_mode(False), torch.no_grad():
            value = layout.fold(self)
        self._folded = (key, value)
        return value

    def _post_is_relu(self) -> bool:
        """Whether the adapter's post-op is a plain ReLU (fused into the kernels' epilogue); computed once."""
        if self._fused_post is None:
            self._fused_post = post_is_relu(self.adapter, self._block)
        return self._fused_post

    def native_gate(self) -> NativeGate | None:
        """The block's inference decision as operands of the compiled gated pair
        (:func:`~dynnet.kernels.channel.gated_pair_single`), or ``None`` when its gate has no compiled form (the
        decision then runs in Python: :meth:`sparse_scale`). Called only in eval mode."""
        return None

    def _forward_native(
        self, x: Tensor, decision: Decision | None = None, scale: Tensor | None = None
    ) -> Tensor | None:
        """The whole block for one sample in one compiled call (decision, kept channels, shortcut + ReLU), or
        ``None`` when it does not apply: gradients on, no compiled form of the post-op, of the gate (when no
        decision is given) or of these operands.

        Without ``decision`` the block's own gate runs inside the call (:meth:`native_gate`); with one (a
        controller's), its multipliers ``scale`` (default ``decision.hard``), Tensor[1, C], are passed in. The
        call's operands are cached as a plan, valid while no source tensor (convolution, batch norm, gate) is edited
        in place or re-pointed (a ``Stamp`` of the extension checks them all in one call) and no parameter, buffer
        or submodule is registered or replaced on any module (:func:`~dynnet.core.cache.structure_generation`).
        The batch norms' ``eps`` is read when the plan is built.
        """
        if torch.is_grad_enabled() or type(x) is not Tensor or x.dtype != torch.float32 or not x.is_cpu:
            return None
        if tracing_or_compiling() or native.disabled():
            return None
        plan = self.valid_plan()
        if plan is None:
            return None
        gate = plan[4]
        if decision is None:
            if gate is None:
                return None
        else:
            s = decision.hard if scale is None else scale
            if type(s) is not Tensor or tuple(s.shape) != (1, plan[3][0].shape[0]) or not s.is_cpu:
                return None  # the general path validates (and names) a wrong shape
            s = s.reshape(-1).to(torch.float32).contiguous()
            gate = (GATE_GIVEN, s, s, s, s, int(self.binary_scale()))
        return self.run_plan(plan, x, gate)

    def valid_plan(self) -> tuple | None:
        """The block's compiled-call plan (see :meth:`_forward_native`), rebuilt when stale; ``None`` when the
        compiled gated pair does not apply. The caller has checked the input and the mode (eval, no gradients)."""
        plan = self._plan
        if plan is None or plan[0] != structure_generation() or not plan[1].fresh():
            plan = self._build_plan()
        return plan

    def run_plan(self, plan: tuple, x: Tensor, gate: tuple) -> Tensor:
        """The block on one sample Tensor[1, C_in, H, W] as one compiled call, with ``gate`` the gate operands
        (``plan[4]``, or ``(GATE_GIVEN, s, s, s, s, binary)`` for multipliers ``s`` Tensor[C] decided outside)."""
        op, weights, projection = plan[2], plan[3], plan[5]
        if not native.observed():
            op = native.direct("gated_pair3x3")
        x = x.contiguous()
        if projection is not None:  # the downsampling shortcut inside the call too
            return op(x, *gate, *weights, None, True, *projection)[0]
        return op(x, *gate, *weights, x if plan[6] else self.shortcut(x).contiguous(), True, None, None)[0]

    def _build_plan(self) -> tuple | None:
        """``(generation, stamp, op, weights, gate_operands, projection, identity)`` for :meth:`_forward_native`,
        stored on the block, or ``None`` (nothing stored) when the compiled gated pair does not apply.
        ``gate_operands`` is ``None`` when the gate has no compiled form (only given decisions then run compiled);
        ``projection`` is the BN-folded 1×1 shortcut ``(Tensor[C_out, C_in], Tensor[C_out])`` of a downsampling
        block, or ``None``; ``identity`` whether the shortcut is the identity (the input is passed as residual)."""
        self._plan = None
        ext = native.load(warn=False) if self.layout.kind == "basic" else None
        if ext is None or not self._post_is_relu():
            return None
        generation = structure_generation()
        gate = self.native_gate()
        w1, b1, w2, b2, spec1, spec2 = self.folded_weights()
        call = gated_pair_plan(w1, b1, w2, b2, spec1, spec2, gate)
        sources = [*self._fold_sources(), *(() if gate is None else gate.sources)]
        projection, projection_sources = folded_projection(self.adapter, self._block, spec1.stride)
        sources += projection_sources
        if projection is not None and (projection[0].dtype != torch.float32 or not projection[0].is_cpu):
            projection = None
        sources = [t for t in sources if t is not None]
        if call is None or any(t.is_inference() for t in sources):
            return None
        identity = identity_shortcut(self.adapter, self._block)
        self._plan = (generation, ext.Stamp(sources), *call, projection, identity)
        return self._plan

    def folded_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor, ConvSpec, ConvSpec]:
        """``(w1, b1, w2, b2, spec1, spec2)``: both convolutions with their batch norms folded (eval only).

        Cached without autograd until a weight, BN parameter or running statistic is replaced or edited in place
        (:func:`~dynnet.core.version_key`); with gradients enabled (or under tracing/compilation) they
        are recomputed on every call so that gradients reach the parameters.
        """
        m = self._modules
        c1, n1, c2, n2 = m["conv1"], m["bn1"], m["conv2"], m["bn2"]
        key = None
        if not (torch.is_grad_enabled() or tracing_or_compiling()):
            versions = version_key(*self._fold_sources())
            key = None if versions is None else (*versions, n1.eps, n2.eps, n1.training, n2.training)
        if key is None:
            w1, b1 = fold_bn(c1, n1)
            w2, b2 = fold_bn(c2, n2)
            return w1, b1, w2, b2, ConvSpec.of(c1), ConvSpec.of(c2)
        folded = self._folded
        if folded is not None and folded[0] == key:
            return folded[1]
        spec1, spec2 = ConvSpec.of(c1), ConvSpec.of(c2)
        with torch.inference_mode(False), torch.no_grad():
            w1, b1 = fold_bn(c1, n1)
            w2, b2 = fold_bn(c2, n2)
            if native_pair_usable(spec1, spec2, w1, w2):
                # The compiled batch-1 kernel reads NCHW weights.
                w1, w2 = w1.contiguous(), w2.contiguous()
            # Otherwise the folds keep the convolution weights' memory format (channels-last models stay so).
            weights = (w1, b1.contiguous(), w2, b2.contiguous())
        value = (*weights, spec1, spec2)
        self._folded = (key, value)
        return value

    def _fold_sources(self) -> list[Tensor | None]:
        """The tensors the folded weights derive from (convolution weights and biases, batch-norm parameters and
        running statistics)."""
        # Read the tensors from the module dicts: nn.Module.__getattr__ costs more than a batch-1 slice.
        m = self._modules
        c1, n1, c2, n2 = m["conv1"], m["bn1"], m["conv2"], m["bn2"]
        tensors = [c._parameters[k] for c in (c1, c2) for k in ("weight", "bias")]
        tensors += [n._parameters[k] for n in (n1, n2) for k in ("weight", "bias")]
        tensors += [n._buffers[k] for n in (n1, n2) for k in ("running_mean", "running_var")]
        return tensors

    # -- bookkeeping ----------------------------------------------------------------------------
    def _decision(self, x: Tensor, decision: Decision | None, scale: Tensor | None) -> tuple[Decision, Tensor]:
        if decision is None:
            decision, scale = self.decide(x)
        if scale is None:
            scale = decision.hard
        expected = (x.shape[0], self.channels)
        if tuple(decision.hard.shape) != expected or tuple(scale.shape) != expected:
            raise ValueError(
                f"{self.block_name}: expected a decision and scale of shape {expected}, "
                f"got {tuple(decision.hard.shape)} and {tuple(scale.shape)}"
            )
        return decision, scale

    def kept_channels(self, d: Decision) -> Tensor:
        """Tensor[N] float64: the gated channels decision ``d`` keeps per sample (differentiable through the
        straight-through ``d.hard``)."""
        return d.hard.double().sum(1)

    def branch_macs_per_channel(self, x: Tensor) -> float:
        """MACs of the gated part (basic block: ``conv1`` + ``conv2``) for one inner channel of one sample (exact:
        both are linear in C)."""
        return self.cost("gated", lambda m, inp: m.gated_body(inp), x) / self.channels

    def fixed_branch_macs(self, x: Tensor) -> float:
        """MACs of the branch that do not depend on the kept channels (a Bottleneck's ``conv3``; else 0)."""
        if self.layout.kind == "basic":
            return 0.0
        body = self.cost("body", lambda m, inp: m.body(inp), x)
        return body - self.cost("gated", lambda m, inp: m.gated_body(inp), x)

    def _record(self, x: Tensor, d: Decision, executed_channels: Tensor | None) -> None:
        t = current_trace()
        if t is None:
            return
        t.record_decision(self.block_name, d)
        n, c = x.shape[0], self.channels
        per, fixed = self.branch_macs_per_channel(x), self.fixed_branch_macs(x)
        body = fixed + per * c
        macs = fixed + self.kept_channels(d) * per
        executed = body if executed_channels is None else fixed + executed_channels.double() * per
        t.record_macs(f"{self.block_name}/body", macs, executed=executed, minimum=fixed, maximum=body, dense=body)
        for part in ("gate", "saliency"):
            if hasattr(self, part):
                g = self.cost(part, lambda m, inp, p=part: getattr(m, p)(inp), x)
                t.record_macs(f"{self.block_name}/{part}", float(g), batch_size=n, minimum=g, maximum=g)


def convert_blocks(
    model: nn.Module, targets: Targets, make: Callable[[str, nn.Module, ResidualAdapter], ChannelGatedBlock]
) -> list[ChannelGatedBlock]:
    """Replace every target residual block of ``model`` (in place) by ``make(name, block, adapter)``.

    Returns:
        The new blocks in execution order (their ``block_name`` is set).
    """
    new_blocks = []
    for name, block, adapter in residual_blocks(model, targets):
        new = make(name, block, adapter)
        new.block_name = name
        replace_module(model, name, new)
        new_blocks.append(new)
    return new_blocks
