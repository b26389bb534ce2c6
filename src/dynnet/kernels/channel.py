"""Channel-sliced execution of a conv → ReLU → conv pair whose inner channels are gated per input.

A residual block's inner channels (the outputs of ``conv1``, the inputs of ``conv2``) can be switched off per
input without changing the block's output width. For a sample whose kept inner channels are ``S`` (|S| = k of C)
the kernels below run

    ``y = conv2(relu(conv1(x; W1[S], b1[S])) * scale[S]; W2[:, S]) + b2``

i.e. ``conv1`` computes only the kept output channels and ``conv2`` reads only the kept input channels: both cost
``k / C`` of their dense MACs and nothing is computed for the gated-off channels. Batch norms are folded into the
convolutions first (:func:`fold_bn`, inference only), so slicing the folded weight slices the normalisation
consistently.

Strategies for a batch (each returns the same values; they differ in speed and in executed MACs):

* ``"dense"``  — every channel of every sample is on: the plain convolutions (the all-on fast path);
* ``"groups"`` — samples with identical masks are gathered and run with one weight slice per distinct mask
  (executed MACs = theoretical MACs). Best when masks repeat (nested widths, RNP, batch 1);
* ``"padded"`` — one grouped convolution (``groups = N``) with every sample's own weight slice, padded to the
  largest kept count ``k_max`` of the batch (executed MACs = ``k_max`` per sample; exact when all samples keep
  the same number of channels, as k-winners-take-all does);
* ``"per_sample"`` — a loop over samples (executed = theoretical; the reference for the other two);
* ``"auto"`` — ``dense`` when everything is on, otherwise ``groups`` when there are few distinct masks
  (at most ``max(1, N // 8)``), otherwise ``padded``: on the shared 2-core CPU of
  ``benchmarks/channel_strategies.py`` (very noisy timings) one padded grouped convolution beat a loop over
  ~N distinct masks by 3-10× at batch 64, even with 30-40 % padding waste.

All functions are pure: per-batch masks are arguments, never module state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.kernels import native

__all__ = [
    "GATE_GIVEN",
    "GATE_INSTANCE",
    "GATE_KWTA",
    "GATE_MLP",
    "STRATEGIES",
    "ConvSpec",
    "NativeGate",
    "block_pair_macs",
    "choose_strategy",
    "fold_bn",
    "gated_pair_plan",
    "gated_pair_reference",
    "gated_pair_single",
    "gated_rest_add_",
    "gated_rest_conv",
    "sliced_conv_in",
    "sliced_pair",
    "sliced_pair_single",
    "tile_gated_pair_macs",
    "tile_gated_pair_op",
    "tile_gated_pair_reference",
]

STRATEGIES = ("auto", "dense", "groups", "padded", "per_sample")

# Gate kinds of the compiled gated pair (torch.ops.dynnet.gated_pair3x3), see :func:`gated_pair_single`.
GATE_MLP = 0
GATE_KWTA = 1
GATE_GIVEN = 2
GATE_INSTANCE = 3


class NativeGate(NamedTuple):
    """A block's inference decision as operands of the compiled gated pair (see :func:`gated_pair_single`).

    Attributes:
        kind: :data:`GATE_MLP`, :data:`GATE_KWTA`, :data:`GATE_GIVEN` or :data:`GATE_INSTANCE`.
        gw1, gb1, gw2, gb2: the gate's operands (see :func:`gated_pair_single`; unused ones may repeat ``gw1``).
        k: channels kept by k-WTA; for given multipliers, non-zero when they are binary; unused otherwise.
        sources: the parameters and buffers the operands derive from: a plan holding the operands is stale once
            one of them is edited in place.
    """

    kind: int
    gw1: Tensor
    gb1: Tensor
    gw2: Tensor
    gb2: Tensor
    k: int
    sources: tuple[Tensor, ...] = ()


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of a 2-D convolution with ``groups == 1`` (taken from an ``nn.Conv2d``)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvSpec:
        if conv.groups != 1 or not isinstance(conv.padding, tuple):
            raise ValueError(f"channel slicing needs a dense convolution with numeric padding, got {conv}")
        return cls(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))  # type: ignore[arg-type]

    def conv(self, x: Tensor, w: Tensor, b: Tensor | None = None, groups: int = 1) -> Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)


def fold_bn(conv: nn.Conv2d | nn.Linear, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode batch norm into the preceding convolution (or linear layer: a BatchNorm1d after it).

    Returns:
        ``(weight, bias)``: the layer's weight shape (Tensor[C_out, C_in, kh, kw] or Tensor[C_out, C_in]) and
        Tensor[C_out] with ``bn(layer(x)) == layer(x; weight, bias)``.
    """
    if bn.training or bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn needs a batch norm in eval mode with running statistics")
    inv = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(inv)
    w = conv.weight * (gamma * inv).view(-1, *([1] * (conv.weight.dim() - 1)))
    b = beta - bn.running_mean * gamma * inv
    if conv.bias is not None:
        b = b + conv.bias * gamma * inv
    return w, b


def gated_pair_reference(
    x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, scale: Tensor, spec1: ConvSpec, spec2: ConvSpec
) -> Tensor:
    """Dense reference: ``conv2(relu(conv1(x)) * scale) + b2`` computing every channel.

    Args:
        x: Tensor[N, C_in, H, W].
        w1, b1: Tensor[C, C_in, k, k], Tensor[C] (first convolution, BN folded).
        w2, b2: Tensor[C_out, C, k, k], Tensor[C_out] (second convolution, BN folded).
        scale: Tensor[N, C] per-sample channel multipliers; 0 switches a channel off.
    """
    h = F.relu(spec1.conv(x, w1, b1)) * scale[:, :, None, None]
    return spec2.conv(h, w2, b2)


def choose_strategy(active: Tensor, strategy: str = "auto") -> str:
    """Resolve ``"auto"`` for a Tensor[N, C] bool mask of kept channels (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    n = active.shape[0]
    if bool(active.all()):
        return "dense"
    if n == 1:
        return "groups"
    distinct = torch.unique(active, dim=0).shape[0]
    if distinct <= max(1, n // 8):
        return "groups"
    return "padded"


def _out_hw(spec1: ConvSpec, spec2: ConvSpec, x: Tensor, w1: Tensor, w2: Tensor) -> tuple[int, int]:
    size = []
    for d in range(2):
        s = x.shape[2 + d]
        for spec, w in ((spec1, w1), (spec2, w2)):
            k = w.shape[2 + d]
            s = (s + 2 * spec.padding[d] - spec.dilation[d] * (k - 1) - 1) // spec.stride[d] + 1
        size.append(s)
    return size[0], size[1]


def _conv_out(size: int, kernel: int, spec: ConvSpec, d: int) -> int:
    return (size + 2 * spec.padding[d] - spec.dilation[d] * (kernel - 1) - 1) // spec.stride[d] + 1


def _run_slice(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    scale: Tensor | None,
    channels: Tensor,
    spec1: ConvSpec,
    spec2: ConvSpec,
) -> Tensor:
    """One weight slice for every sample of ``x`` (Tensor[M, C_in, H, W]); ``channels`` Tensor[k] long."""
    h = F.relu(spec1.conv(x, w1.index_select(0, channels), b1.index_select(0, channels)))
    if scale is not None:
        h = h * scale.index_select(1, channels)[:, :, None, None]
    return spec2.conv(h, w2.index_select(1, channels), b2)


_UNIT = ConvSpec((1, 1), (1, 1), (1, 1))
_STRIDE2 = ConvSpec((2, 2), (1, 1), (1, 1))


def native_pair_usable(spec1: ConvSpec, spec2: ConvSpec, w1: Tensor, w2: Tensor) -> bool:
    """Whether the compiled batch-1 pair kernel (``sliced_pair3x3``) handles this pair of convolutions: both 3×3
    with padding 1 and no dilation, the first of stride 1 or 2, the second of stride 1, float32 on CPU, and the
    extension is available."""
    return _pair_geometry_ok(spec1, spec2, w1, w2) and native.load() is not None


def _pair_geometry_ok(spec1: ConvSpec, spec2: ConvSpec, w1: Tensor, w2: Tensor) -> bool:
    return (
        spec1 in (_UNIT, _STRIDE2)
        and spec2 == _UNIT
        and w1.shape[2:] == (3, 3)
        and w2.shape[2:] == (3, 3)
        and w1.dtype == torch.float32
        and w1.device.type == "cpu"
    )


def _native_pair(
    x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, s: Tensor, spec1: ConvSpec, spec2: ConvSpec
):
    """The compiled pair op when it can run this batch-1 pair, else ``None``: inference (nothing to
    differentiate), plain float32 CPU tensors, NCHW-contiguous weights (as :meth:`ChannelGatedBlock.folded_weights`
    keeps them when the extension is present), 3×3 / padding 1 convolutions of stride 1 or 2, then 1.

    Runs once per block per image, so the checks are ordered cheapest first and the geometry check is memoised.
    """
    if s.dtype != torch.float32 or not _native_pair_ok(x, w1, b1, w2, b2, spec1, spec2):
        return None
    return _native_ops()[0]


def _native_pair_ok(
    x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, spec1: ConvSpec, spec2: ConvSpec
) -> bool:
    """Whether the compiled pair kernels can run this batch-1 pair (see :func:`_native_pair`)."""
    if not _native_operands_ok(x, w1, b1, w2, b2):
        return False
    key = (spec1, spec2, w1.shape[2], w1.shape[3], w2.shape[2], w2.shape[3], type(w1), type(w2), w1.device.type)
    usable = _USABLE.get(key)
    if usable is None:
        usable = _USABLE[key] = type(w1) in _PLAIN and type(w2) in _PLAIN and _pair_geometry_ok(spec1, spec2, w1, w2)
    return usable and native.load() is not None


def _native_operands_ok(x: Tensor, *operands: Tensor) -> bool:
    """What both compiled channel kernels need: one sample of a plain float32 CPU input, float32 NCHW-contiguous
    weights and biases, and nothing to differentiate (they have no backward)."""
    if x.shape[0] != 1 or x.dtype != torch.float32 or x.device.type != "cpu" or type(x) not in _PLAIN:
        return False
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    return all(t.dtype == torch.float32 and t.is_contiguous() and not (grad and t.requires_grad) for t in operands)


_USABLE: dict[tuple, bool] = {}
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_OPS: list[tuple] = []


def native_conv3x3_in(x: Tensor, w: Tensor, b: Tensor, active: Tensor | None, spec: ConvSpec):
    """``conv(x · active; w) + b`` for one sample on the compiled kernel, reading only the active input channels.

    Args:
        x: Tensor[1, C, H, W]; w, b: Tensor[C_out, C, 3, 3] (NCHW-contiguous), Tensor[C_out].
        active: Tensor[C] (non-zero = read) or ``None`` (every channel).
        spec: the convolution's geometry.

    Returns:
        ``(y, k)`` — Tensor[1, C_out, H', W'] and the number of channels read — or ``None`` when the compiled
        kernel does not apply (not 3×3 / padding 1 / stride 1 or 2, gradients, other dtypes or devices, no
        extension); the caller then runs its PyTorch path.
    """
    if type(w) not in _PLAIN or not _native_operands_ok(x, w, b):
        return None
    if spec not in (_UNIT, _STRIDE2) or w.shape[2:] != (3, 3) or native.load() is None:
        return None
    act = x.new_ones(x.shape[1]) if active is None else active.reshape(-1).to(torch.float32).contiguous()
    return _native_ops()[1](x.contiguous(), w, b, act, spec.stride[0])


def block_pair_macs(x: Tensor, w2: Tensor, y: Tensor, kept: int, shortcut_w: Tensor | None) -> int:
    """MACs of a compiled block call's convolutions: ``kept`` inner channels of the 3×3 pair (input x
    Tensor[1, C_in, H, W], w2 Tensor[C_out, C, 3, 3], output y Tensor[1, C_out, H', W']) and the 1×1 projection
    shortcut ``shortcut_w`` Tensor[C_out, C_in] when the call computes it."""
    extra = 0 if shortcut_w is None else shortcut_w.numel() * y.shape[2] * y.shape[3]
    return extra + kept * (x.shape[1] + w2.shape[0]) * 9 * y.shape[2] * y.shape[3]


def _native_ops() -> tuple:
    """``(torch.ops.dynnet.sliced_pair3x3, torch.ops.dynnet.conv3x3_in, torch.ops.dynnet.gated_pair3x3)``,
    dispatcher ops so that the MAC counter sees them, with their MAC rules registered on first use:
    ``k · (C_in + C_out) · 9 · H_out · W_out`` for the pair, ``k · C_out · 9 · H_out · W_out`` for the input-sliced
    convolution (``k`` the channels kept or read), and for the gated pair the pair's plus its gate's matrix-vector
    products (``J·C_in + C·J`` for the pooled MLP, ``C·C_in`` for k-WTA, none for given multipliers), as the counter
    counts the Python gates' ``addmm`` (the pooling is not a MAC); for instance sparsity every channel of ``conv1``
    and the ``k`` kept inputs of ``conv2``. The fourth, ``torch.ops.dynnet.tile_gated_pair3x3``, counts
    :func:`tile_gated_pair_macs`."""
    if _OPS:
        return _OPS[0]
    op, conv, gated = torch.ops.dynnet.sliced_pair3x3, torch.ops.dynnet.conv3x3_in, torch.ops.dynnet.gated_pair3x3
    tiled = torch.ops.dynnet.tile_gated_pair3x3
    from dynnet.macs import MAC_RULES, register_mac_rule

    _OPS.append((op, conv, gated, tiled))
    if tiled not in MAC_RULES:

        @register_mac_rule(tiled)
        def _tiled_rule(args: tuple, kwargs: dict, out: object) -> int:
            x, w1, base1, w2, base2 = args[0], args[1], args[3], args[4], args[6]
            shortcut = args[9] if len(args) > 9 else kwargs.get("shortcut_w")
            y, _, _, e1, e2 = out  # type: ignore[misc]
            return tile_gated_pair_macs(x, w1, base1, w2, base2, y, int(e1), int(e2), shortcut)

    if op not in MAC_RULES:

        @register_mac_rule(op)
        def _pair_rule(args: tuple, kwargs: dict, out: object) -> int:
            x, w2 = args[0], args[3]
            y, kept = out  # type: ignore[misc]
            return int(kept) * (x.shape[1] + w2.shape[0]) * 9 * y.shape[2] * y.shape[3]

    if conv not in MAC_RULES:

        @register_mac_rule(conv)
        def _conv_rule(args: tuple, kwargs: dict, out: object) -> int:
            y, kept = out  # type: ignore[misc]
            return int(kept) * y.shape[1] * 9 * y.shape[2] * y.shape[3]

    if gated not in MAC_RULES:

        @register_mac_rule(gated)
        def _gated_rule(args: tuple, kwargs: dict, out: object) -> int:
            x, kind, gw1, gw2, w1, w2 = args[0], args[1], args[2], args[4], args[7], args[9]
            y, _, kept = out  # type: ignore[misc]
            shortcut = args[14] if len(args) > 14 else kwargs.get("shortcut_w")
            if kind == GATE_INSTANCE:  # conv1 on every channel, conv2 on the kept ones
                plane = 9 * y.shape[2] * y.shape[3]
                extra = 0 if shortcut is None else shortcut.numel() * y.shape[2] * y.shape[3]
                return extra + w1.shape[0] * x.shape[1] * plane + int(kept) * w2.shape[0] * plane
            gate = {GATE_MLP: gw1.numel() + gw2.numel(), GATE_KWTA: gw1.numel()}.get(kind, 0)
            return gate + block_pair_macs(x, w2, y, int(kept), shortcut)

    return _OPS[0]


def sliced_pair_single(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    scale: Tensor,
    spec1: ConvSpec,
    spec2: ConvSpec,
    *,
    binary: bool = False,
    residual: Tensor | None = None,
    relu: bool = False,
) -> tuple[Tensor, int]:
    """:func:`sliced_pair` for one sample, with as few kernel launches as possible (the batch-1 inference path).

    At batch 1 a ResNet-20 block's convolutions take tens of microseconds, so every extra op (mask comparison,
    ``all()``, ``sum()``, a count tensor) costs a visible fraction of the saving. Here the kept channels come from
    one ``nonzero`` on ``scale`` itself; every channel kept → the plain convolutions (no slicing); none kept →
    the folded bias ``b2`` (no MACs); otherwise one weight slice.

    Args:
        x: Tensor[1, C_in, H, W].
        w1, b1, w2, b2, spec1, spec2: as :func:`sliced_pair` (BN folded).
        scale: Tensor[1, C] or Tensor[C] channel multipliers (0 = off).
        binary: the kept channels are multiplied by 1 (only the non-zero positions of ``scale`` matter).
        residual: Tensor[1, C_out, H', W'] added to the result (the block's shortcut), or ``None``.
        relu: apply a ReLU at the end (after the residual): with both, the whole basic block's output, which the
            compiled kernel computes in its epilogue.

    Returns:
        ``(y, k)``: Tensor[1, C_out, H', W'] and the number of inner channels computed.
    """
    s = scale.reshape(-1)
    op = _native_pair(x, w1, b1, w2, b2, s, spec1, spec2)
    if op is not None and (residual is None or _native_residual_ok(residual)):
        res = None if residual is None else residual.contiguous()
        return op(x.contiguous(), w1, b1, w2, b2, s.contiguous(), binary, spec1.stride[0], res, relu)
    y, k = _sliced_pair_single_torch(x, w1, b1, w2, b2, s, spec1, spec2, binary)
    if residual is not None:
        y = residual + y
    return (y.relu() if relu else y), k


def gated_pair_single(
    x: Tensor,
    gate: NativeGate,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    spec1: ConvSpec,
    spec2: ConvSpec,
    *,
    residual: Tensor | None = None,
    relu: bool = False,
) -> tuple[Tensor, Tensor, int] | None:
    """A block's decision and its channel-sliced pair for one sample in one compiled call, or ``None`` when the
    compiled kernel does not apply (then the caller runs the gate and :func:`sliced_pair_single`).

    At batch 1 the gate's few small ops (pooling, two matrix-vector products, a threshold or a top-k, a scatter)
    cost about as much as the kept channels' convolutions; here they run inside the kernel call.

    Args:
        x: Tensor[1, C_in, H, W].
        gate: ``(kind, gw1, gb1, gw2, gb2, k)``:

            * :data:`GATE_MLP`: ``h = relu(gw1 · mean_hw(x) + gb1)`` (gw1 Tensor[J, C_in] with the gate's BN folded),
              ``logits = gw2 · h + gb2`` (gw2 Tensor[C, J]); channel ``c`` is kept, multiplier 1, where
              ``logits[c] > 0`` (``k`` unused);
            * :data:`GATE_KWTA`: ``g = relu(gw1 · mean_hw|x| + gb1)`` (gw1 Tensor[C, C_in]); the ``k`` largest
              ``g`` are kept (ties: lowest index) with multiplier ``g`` (FBS); ``gw2``, ``gb2`` are unused;
            * :data:`GATE_GIVEN`: the multipliers ``gw1`` Tensor[C] (a decision made outside the block); with
              ``k != 0`` they are binary (non-zero = kept with multiplier 1);
            * :data:`GATE_INSTANCE`: ``conv1`` computes every channel and ``conv2`` reads the channels whose RMS
              exceeds ``gw1[0]`` (Tensor[1]) times the mean RMS and is non-zero
              (:func:`~dynnet.losses.instance_sparsity.instance_keep_mask`); ``k`` is then ``conv2``'s inputs.
        w1, b1, w2, b2, spec1, spec2: as :func:`sliced_pair` (BN folded).
        residual, relu: as :func:`sliced_pair_single`.

    Returns:
        ``(y, scale, k)``: Tensor[1, C_out, H', W'], the multipliers used Tensor[C] (the 0/1 decision for
        :data:`GATE_INSTANCE`) and the kept count, or ``None``.
    """
    kind, gw1, gb1, gw2, gb2, k, _ = gate
    if not _native_pair_ok(x, w1, b1, w2, b2, spec1, spec2) or not _native_operands_ok(x, gw1, gb1, gw2, gb2):
        return None
    if residual is not None and not _native_residual_ok(residual):
        return None
    res = None if residual is None else residual.contiguous()
    return _native_ops()[2](x.contiguous(), kind, gw1, gb1, gw2, gb2, k, w1, b1, w2, b2, spec1.stride[0], res, relu)


def gated_pair_plan(
    w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, spec1: ConvSpec, spec2: ConvSpec, gate: NativeGate | None = None
) -> tuple[object, tuple, tuple | None] | None:
    """The operands of :func:`gated_pair_single` without its per-call checks, for a block that caches them:
    ``(op, weights, gate_operands)`` such that ``op(x, *gate_operands, *weights, residual, relu)`` runs the block,
    or with a decision made outside, ``op(x, GATE_GIVEN, s, s, s, s, binary, *weights, residual, relu)``.
    ``gate_operands`` is ``None`` without ``gate``. ``None`` when the compiled kernel cannot run these weights (not
    3×3 / padding 1 / stride 1 or 2 then 1, not float32 NCHW-contiguous CPU tensors, no extension). The caller
    checks the input (one float32 CPU sample, gradients off) on every call."""
    operands = (w1, b1, w2, b2) if gate is None else (w1, b1, w2, b2, gate.gw1, gate.gb1, gate.gw2, gate.gb2)
    if not all(type(t) in _PLAIN and t.dtype == torch.float32 and t.is_contiguous() and t.is_cpu for t in operands):
        return None
    if not _pair_geometry_ok(spec1, spec2, w1, w2) or native.load() is None:
        return None
    weights = (w1, b1, w2, b2, spec1.stride[0])
    if gate is None:
        return _native_ops()[2], weights, None
    gw1, gb1, gw2, gb2 = (t.detach() for t in operands[4:])
    return _native_ops()[2], weights, (gate.kind, gw1, gb1, gw2, gb2, gate.k)


def _native_residual_ok(residual: Tensor) -> bool:
    return (
        residual.dtype == torch.float32
        and residual.device.type == "cpu"
        and type(residual) in _PLAIN
        and not (torch.is_grad_enabled() and residual.requires_grad)
    )


def _sliced_pair_single_torch(
    x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, s: Tensor, spec1: ConvSpec, spec2: ConvSpec, binary: bool
) -> tuple[Tensor, int]:
    """The PyTorch path of :func:`sliced_pair_single` (``s``: Tensor[C] multipliers)."""
    channels = s.nonzero().squeeze(1)
    k, c = channels.shape[0], s.shape[0]
    if k == c:  # all on: no slicing
        h = spec1.conv(x, w1, b1).relu_()
        if not binary:
            h = h * s[None, :, None, None]
        return spec2.conv(h, w2, b2), k
    if k == 0:
        ho, wo = _out_hw(spec1, spec2, x, w1, w2)
        return b2.view(1, -1, 1, 1).expand(x.shape[0], -1, ho, wo), 0
    h = spec1.conv(x, w1.index_select(0, channels), b1.index_select(0, channels)).relu_()
    if not binary:
        h = h * s.index_select(0, channels)[None, :, None, None]
    return spec2.conv(h, w2.index_select(1, channels), b2), k


def sliced_pair(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    scale: Tensor,
    spec1: ConvSpec,
    spec2: ConvSpec,
    *,
    binary: bool = False,
    strategy: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``conv2(relu(conv1(x)) * scale) + b2`` computing only the channels with ``scale != 0``.

    Args:
        x: Tensor[N, C_in, H, W].
        w1, b1: Tensor[C, C_in, k, k], Tensor[C] first convolution (BN folded).
        w2, b2: Tensor[C_out, C, k, k], Tensor[C_out] second convolution (BN folded).
        scale: Tensor[N, C] channel multipliers (0 = off).
        spec1, spec2: geometry of the two convolutions.
        binary: the kept channels are multiplied by 1: only the positions of the non-zeros of ``scale`` matter
            (its values are ignored), and the multiplication is skipped.
        strategy: one of :data:`STRATEGIES`.

    Returns:
        ``(y, executed)``: Tensor[N, C_out, H', W'] and Tensor[N] float64 — the number of inner channels the
        kernels really computed for each sample (``k_n``, ``k_max`` for ``"padded"``, ``C`` for ``"dense"``).
    """
    n, c = scale.shape
    if x.shape[0] != n or w1.shape[0] != c or w2.shape[1] != c:
        raise ValueError(
            f"shapes disagree: x {tuple(x.shape)}, scale {tuple(scale.shape)}, "
            f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}"
        )
    if n == 1 and strategy in ("auto", "groups", "per_sample"):  # one slice, no grouping work
        y, k = sliced_pair_single(x, w1, b1, w2, b2, scale, spec1, spec2, binary=binary)
        return y, torch.full((1,), float(k), dtype=torch.float64, device=x.device)
    active = scale != 0
    mult = None if binary else scale
    how = choose_strategy(active, strategy)
    if how == "dense":
        h = F.relu(spec1.conv(x, w1, b1))
        if mult is not None:
            h = h * scale[:, :, None, None]
        elif not bool(active.all()):
            h = h * active.to(h.dtype)[:, :, None, None]
        return spec2.conv(h, w2, b2), torch.full((n,), float(c), dtype=torch.float64, device=x.device)
    ho, wo = _out_hw(spec1, spec2, x, w1, w2)
    counts = active.sum(1)
    if how == "padded":
        return _padded(x, w1, b1, w2, b2, scale, active, counts, spec1, spec2, (ho, wo), binary)
    out = b2.view(1, -1, 1, 1).expand(n, -1, ho, wo).contiguous()
    if how == "per_sample":
        groups = [(torch.tensor([i], device=x.device), active[i]) for i in range(n)]
    elif how == "groups":
        masks, inverse = torch.unique(active, dim=0, return_inverse=True)
        groups = [((inverse == g).nonzero().squeeze(1), masks[g]) for g in range(masks.shape[0])]
    else:
        raise ValueError(f"unknown strategy {how!r}")
    for samples, mask in groups:
        channels = mask.nonzero().squeeze(1)
        if channels.numel() == 0:
            continue  # the block's branch is the folded BN bias alone: no MACs
        if samples.numel() == n:
            return _run_slice(x, w1, b1, w2, b2, mult, channels, spec1, spec2), counts.double()
        xs = x.index_select(0, samples)
        ms = None if mult is None else mult.index_select(0, samples)
        out.index_copy_(0, samples, _run_slice(xs, w1, b1, w2, b2, ms, channels, spec1, spec2))
    return out, counts.double()


def _padded(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    scale: Tensor,
    active: Tensor,
    counts: Tensor,
    spec1: ConvSpec,
    spec2: ConvSpec,
    out_hw: tuple[int, int],
    binary: bool,
) -> tuple[Tensor, Tensor]:
    """Every sample's own slice in one grouped convolution (``groups = N``), padded to ``k_max`` channels."""
    n = scale.shape[0]
    kmax = int(counts.max())
    executed = torch.full((n,), float(kmax), dtype=torch.float64, device=x.device)
    if kmax == 0:
        return b2.view(1, -1, 1, 1).expand(n, -1, *out_hw).contiguous(), executed
    # Kept channels first (stable order), then padding slots whose multiplier is 0.
    order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, :kmax]  # Tensor[N, k_max]
    valid = torch.arange(kmax, device=x.device) < counts[:, None]
    slot_scale = valid.to(x.dtype) if binary else torch.gather(scale, 1, order) * valid
    flat = order.reshape(-1)
    cin, hh, ww = x.shape[1:]
    h = spec1.conv(x.reshape(1, n * cin, hh, ww), w1.index_select(0, flat), b1.index_select(0, flat), groups=n)
    h = F.relu(h) * slot_scale.reshape(1, -1, 1, 1)
    cout = w2.shape[0]
    # Tensor[N, C_out, k_max, kh, kw] → Tensor[N·C_out, k_max, kh, kw]: sample n's conv2 reads its own slots.
    w2n = (
        w2.index_select(1, flat)
        .view(cout, n, kmax, *w2.shape[2:])
        .transpose(0, 1)
        .reshape(n * cout, kmax, *w2.shape[2:])
    )
    y = spec2.conv(h, w2n, b2.repeat(n), groups=n)
    return y.view(n, cout, *y.shape[2:]), executed


def sliced_conv_in(
    h: Tensor, w: Tensor, b: Tensor, active: Tensor, spec: ConvSpec, *, strategy: str = "auto"
) -> tuple[Tensor, Tensor]:
    """``conv(h * active; w) + b`` reading only the active input channels of each sample (input-side skipping).

    Args:
        h: Tensor[N, C, H, W] the convolution's input.
        w, b: Tensor[C_out, C, k, k], Tensor[C_out] (BN folded).
        active: Tensor[N, C] bool, the input channels each sample keeps.
        spec: the convolution's geometry.
        strategy: one of :data:`STRATEGIES`.

    Returns:
        ``(y, executed)``: Tensor[N, C_out, H', W'] and Tensor[N] float64, the input channels really read.
    """
    n, c = active.shape
    if n == 1 and strategy in ("auto", "groups", "per_sample"):  # one slice: no strategy choice, one nonzero
        fast = native_conv3x3_in(h, w, b, active, spec)
        if fast is not None:
            y, k = fast
            return y, torch.full((1,), float(k), dtype=torch.float64, device=h.device)
        channels = active.reshape(-1).nonzero().squeeze(1)
        k = channels.shape[0]
        executed = torch.full((1,), float(k), dtype=torch.float64, device=h.device)
        if k == c:
            return spec.conv(h, w, b), executed
        if k == 0:
            ho, wo = (_conv_out(h.shape[2 + d], w.shape[2 + d], spec, d) for d in range(2))
            return b.view(1, -1, 1, 1).expand(1, -1, ho, wo), executed
        return spec.conv(h.index_select(1, channels), w.index_select(1, channels), b), executed
    how = choose_strategy(active, strategy)
    counts = active.sum(1)
    if how == "dense":
        if not bool(active.all()):
            h = h * active.to(h.dtype)[:, :, None, None]
        return spec.conv(h, w, b), torch.full((n,), float(c), dtype=torch.float64, device=h.device)
    if how == "padded":
        kmax = int(counts.max())
        if kmax > 0:
            order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, :kmax]  # Tensor[N, k_max]
            valid = (torch.arange(kmax, device=h.device) < counts[:, None]).to(h.dtype)
            hs = torch.gather(h, 1, order[:, :, None, None].expand(-1, -1, *h.shape[2:])) * valid[:, :, None, None]
            cout = w.shape[0]
            wn = w.index_select(1, order.reshape(-1)).view(cout, n, kmax, *w.shape[2:]).transpose(0, 1)
            y = spec.conv(
                hs.reshape(1, n * kmax, *h.shape[2:]), wn.reshape(n * cout, kmax, *w.shape[2:]), b.repeat(n), n
            )
            return y.view(n, cout, *y.shape[2:]), torch.full((n,), float(kmax), dtype=torch.float64, device=h.device)
        how = "groups"
    ho, wo = (_conv_out(h.shape[2 + d], w.shape[2 + d], spec, d) for d in range(2))
    out = b.view(1, -1, 1, 1).expand(n, -1, ho, wo).contiguous()
    if how == "per_sample":
        groups = [(torch.tensor([i], device=h.device), active[i]) for i in range(n)]
    else:
        masks, inverse = torch.unique(active, dim=0, return_inverse=True)
        groups = [((inverse == g).nonzero().squeeze(1), masks[g]) for g in range(masks.shape[0])]
    for samples, mask in groups:
        channels = mask.nonzero().squeeze(1)
        if channels.numel() == 0:
            continue
        hs = h.index_select(0, samples).index_select(1, channels)
        out.index_copy_(0, samples, spec.conv(hs, w.index_select(1, channels), b))
    return out, counts.double()


def gated_rest_conv(x_rest: Tensor, w_rest: Tensor, gate: Tensor, spec: ConvSpec) -> Tensor:
    """The rest of a convolution's partial sum, computed only at the gated-on (output channel, position) entries.

    Used by channel gating (Hua et al.): ``y = p + gate · conv(x_rest; w_rest)``. For each output channel ``o``
    the input patches of its active positions are gathered from the unfolded input and multiplied by ``w_rest[o]``
    in one matrix product, so exactly ``C_rest · k · k`` MACs are spent per active entry.

    Args:
        x_rest: Tensor[N, C_rest, H, W] the input channels outside the base group.
        w_rest: Tensor[C_out, C_rest, k, k].
        gate: Tensor[N, C_out, H', W'] bool, where the rest is computed.
        spec: the convolution's geometry.

    Returns:
        Tensor[N, C_out, H', W']: ``conv(x_rest; w_rest)`` where ``gate``, 0 elsewhere.
    """
    n, cout, ho, wo = gate.shape
    out = x_rest.new_zeros(n * ho * wo, cout)
    if not bool(gate.any()):
        return out.view(n, ho, wo, cout).permute(0, 3, 1, 2)
    cols = F.unfold(x_rest, w_rest.shape[2:], spec.dilation, spec.padding, spec.stride)  # Tensor[N, K, L]
    cols = cols.transpose(1, 2).reshape(n * ho * wo, -1)  # Tensor[N·L, K], row = (sample, position)
    flat_gate = gate.permute(0, 2, 3, 1).reshape(n * ho * wo, cout)
    w = w_rest.reshape(cout, -1)
    for o in range(cout):
        rows = flat_gate[:, o].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        out[rows, o] = torch.mm(cols.index_select(0, rows), w[o : o + 1].t()).squeeze(1)
    return out.view(n, ho, wo, cout).permute(0, 3, 1, 2)


def gated_rest_add_(
    p: Tensor, x_rest: Tensor, w_rest: Tensor, gate: Tensor, spec: ConvSpec, *, dense_density: float = 0.5
) -> tuple[Tensor, Tensor]:
    """``p += gate · conv(x_rest; w_rest)`` without a loop over output channels (channel gating's fast path).

    Output channels are split by the fraction of their (sample, position) entries the gate keeps in the batch:

    * none kept → skipped (0 MACs);
    * at least ``dense_density`` kept → one dense convolution over these output channels (a weight slice),
      multiplied by the gate: every entry of these channels is computed;
    * the others → the gather–GEMM engine of :mod:`dynnet.kernels.spatial` at the union of their active
      positions (one ``index_select`` of the input patches, one GEMM with the weight rows of these channels).

    Each channel is computed at a superset of its gated entries, so the result equals the masked computation,
    and the executed MACs (returned per sample, in entries of ``C_rest · k · k`` MACs) exceed the theoretical
    ones by the union's and the dense channels' extra entries. :func:`gated_rest_conv` is the exact-MAC
    reference (a GEMV per output channel: exact, but a Python loop and slow on CPU).

    Args:
        p: Tensor[N, C_out, H', W'] the base partial sum, updated in place and returned.
        x_rest: Tensor[N, C_rest, H, W].
        w_rest: Tensor[C_out, C_rest, k, k].
        gate: Tensor[N, C_out, H', W'] (bool or 0/1): where the rest is added.
        spec: the convolution's geometry (square kernel, equal stride/padding/dilation along both axes for the
            gather part).
        dense_density: the kept fraction from which a channel is computed densely (0: every channel with an
            active entry dense; above 1: none).

    Returns:
        ``(p, executed)``: ``p`` and Tensor[N] float64, the entries (output channel × position) computed per sample.
    """
    from dynnet.kernels import spatial

    n, cout, ho, wo = gate.shape
    g = gate.to(p.dtype)
    counts = g.sum((0, 2, 3)).tolist()  # one host sync: the partition is decided in Python
    total = n * ho * wo
    dense = [o for o, c in enumerate(counts) if c > 0 and c >= dense_density * total]
    sparse = [o for o, c in enumerate(counts) if 0 < c < dense_density * total]
    executed = torch.zeros(n, dtype=torch.float64, device=p.device)
    if dense:
        if len(dense) == cout:
            p.addcmul_(spec.conv(x_rest, w_rest), g)
        else:
            idx = torch.tensor(dense, device=p.device)
            r = spec.conv(x_rest, w_rest.index_select(0, idx)) * g.index_select(1, idx)
            p.index_add_(1, idx, r)
        executed += len(dense) * ho * wo
    if sparse:
        idx = torch.tensor(sparse, device=p.device)
        gs = g.index_select(1, idx)  # Tensor[N, S, H', W']
        positions = gs.amax(1).nonzero()  # Tensor[P, 3] (n, row, col): the union of the sparse channels' entries
        rows, zero_row = spatial.channels_last_rows(x_rest)
        lookup = spatial.input_lookup(n, x_rest.shape[2], x_rest.shape[3], x_rest.device)
        vals = spatial.gather_conv_rows(
            rows,
            lookup,
            spatial.weight_matrix(w_rest.index_select(0, idx)),
            positions,
            kernel=w_rest.shape[-1],
            stride=spec.stride[0],
            padding=spec.padding[0],
            dilation=spec.dilation[0],
            zero_row=zero_row,
        )  # Tensor[P, S]
        pn, py, px = positions.unbind(1)
        vals = vals * gs.permute(0, 2, 3, 1)[pn, py, px]
        flat = ((pn[:, None] * cout + idx[None, :]) * ho + py[:, None]) * wo + px[:, None]  # Tensor[P, S]
        p.view(-1).index_add_(0, flat.reshape(-1), vals.reshape(-1))
        executed += torch.bincount(pn, minlength=n).double() * len(sparse)
    return p, executed


# Channel gating (Hua et al.) for one sample, per (output channel, 4 × 4 tile) decisions: see tile_gated_pair_op.
TILE = 4


def tile_gated_pair_macs(
    x: Tensor, w1: Tensor, base1: int, w2: Tensor, base2: int, y: Tensor, e1: int, e2: int, shortcut_w: Tensor | None
) -> int:
    """MACs of a tile-gated block call: both base groups densely, ``C_rest · 9`` per gated-on output entry
    (``e1``, ``e2`` entries of ``conv1`` and ``conv2``), and the 1×1 projection shortcut when the call computes it.

    Args:
        x: Tensor[1, C_in, H, W]; w1: Tensor[M, C_in, 3, 3]; w2: Tensor[C_out, M, 3, 3]; y: Tensor[1, C_out, H', W'].
        base1, base2: the base groups' input channels.
        e1, e2: the gated-on output entries of each convolution.
        shortcut_w: Tensor[C_out, C_in] or ``None``.
    """
    plane = y.shape[2] * y.shape[3]
    base = (w1.shape[0] * base1 + w2.shape[0] * base2) * 9 * plane
    rest = (e1 * (x.shape[1] - base1) + e2 * (w2.shape[1] - base2)) * 9
    return base + rest + (0 if shortcut_w is None else shortcut_w.numel() * plane)


def tile_gated_pair_op():
    """``torch.ops.dynnet.tile_gated_pair3x3`` (its MAC rule registered), or ``None`` without the extension.

    ``op(x, w1, a1, base1, w2, a2, base2, stride, residual=None, shortcut_w=None, shortcut_b=None)`` runs a
    channel-gated basic residual block on one sample as :func:`tile_gated_pair_reference`, with ``a1`` Tensor[4, M]
    and ``a2`` Tensor[4, C_out] the rows ``(b, thr, k, c)`` of each convolution (x and all tensors float32,
    contiguous, on the CPU). It returns ``(y, mask1, mask2, e1, e2)``: the block output Tensor[1, C_out, H', W'], the
    decisions Tensor[M, ⌈H'/4⌉, ⌈W'/4⌉] and Tensor[C_out, ⌈H'/4⌉, ⌈W'/4⌉] (0/1), and the gated-on output entries of
    each convolution. The rest of a tile is computed only for its on channels (an im2col of the tile's receptive
    field times their weight rows), so the MACs are those of :func:`tile_gated_pair_macs`.
    """
    if native.load(warn=False) is None:
        return None
    return _native_ops()[3]


def _tile_gated_conv(x: Tensor, w: Tensor, b: Tensor, thr: Tensor, base: int, stride: int) -> tuple[Tensor, Tensor]:
    p = F.conv2d(x[:, :base], w[:, :base], b, stride, 1)
    on = F.avg_pool2d(p, TILE, ceil_mode=True) > thr.view(1, -1, 1, 1)  # Tensor[1, C_out, th, tw]
    h, wd = p.shape[2:]
    s = on.to(p.dtype).repeat_interleave(TILE, 2).repeat_interleave(TILE, 3)[:, :, :h, :wd]
    return p + s * F.conv2d(x[:, base:], w[:, base:], None, stride, 1), on[0].to(p.dtype)


def tile_gated_pair_reference(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    thr1: Tensor,
    k1: Tensor,
    c1: Tensor,
    base1: int,
    w2: Tensor,
    b2: Tensor,
    thr2: Tensor,
    k2: Tensor,
    c2: Tensor,
    base2: int,
    stride: int,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The PyTorch reference of the compiled tile-gated block (:func:`tile_gated_pair_op`).

    Each 3×3 convolution (padding 1) computes ``p = conv(x[:, :base]; W[:, :base]) + b``; channel ``o``'s 4 × 4
    tile of output positions is on where the mean of ``p`` over the tile (its positions inside the output) exceeds
    ``thr[o]``, and there ``conv(x[:, base:]; W[:, base:])`` is added. Then
    ``h = relu(k1 · y1 + c1)`` and ``y = relu(k2 · y2 + c2 + residual)`` (``k, c`` Tensor[C]: the batch norms as
    per-channel affine maps).

    Args:
        x: Tensor[N, C_in, H, W]; w1: Tensor[M, C_in, 3, 3] (stride ``stride``); w2: Tensor[C_out, M, 3, 3]
            (stride 1); b, thr, k, c: Tensor[M] and Tensor[C_out].
        base1, base2: the base groups' input channels.
        residual: Tensor[N, C_out, H', W'] or ``None``.

    Returns:
        ``(y, mask1, mask2)``: Tensor[N, C_out, H', W'] and the decisions of the first sample,
        Tensor[M, ⌈H'/4⌉, ⌈W'/4⌉] and Tensor[C_out, ⌈H'/4⌉, ⌈W'/4⌉] (0/1).
    """
    y1, m1 = _tile_gated_conv(x, w1, b1, thr1, base1, stride)
    h = torch.relu(k1.view(1, -1, 1, 1) * y1 + c1.view(1, -1, 1, 1))
    y2, m2 = _tile_gated_conv(h, w2, b2, thr2, base2, 1)
    y = k2.view(1, -1, 1, 1) * y2 + c2.view(1, -1, 1, 1)
    return torch.relu(y if residual is None else y + residual), m1, m2
