"""The gate of a channel-gated pair inside the compiled call: a block's decision and its kept channels in one call.

At batch 1 a gate's few small ops (pooling, two matrix-vector products, a threshold or a top-k, a scatter) cost
about as much as the kept channels' convolutions, so ``torch.ops.dynnet.gated_pair3x3`` computes the decision
too. The gate functions it knows are generic, named by what they compute (:data:`GATE_MLP`, :data:`GATE_KWTA`,
:data:`GATE_GIVEN`, :data:`GATE_INSTANCE`); a gate module describes itself as a :class:`NativeGate` of one of
them. Imports :mod:`~dynnet.kernels.channel._spec` and :mod:`~dynnet.kernels.channel._compiled`, within the
package.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dynnet.kernels import native
from dynnet.kernels.channel._compiled import (
    PLAIN,
    block_pair_macs,
    compiled_op,
    operands_ok,
    pair_geometry_ok,
    pair_operands_ok,
    residual_ok,
)
from dynnet.kernels.channel._spec import ConvSpec

__all__ = [
    "GATE_GIVEN",
    "GATE_INSTANCE",
    "GATE_KWTA",
    "GATE_MLP",
    "NativeGate",
    "gated_pair_plan",
    "gated_pair_single",
]

# Gate kinds of the compiled gated pair (torch.ops.dynnet.gated_pair3x3), see gated_pair_single.
GATE_MLP = 0  # pooled MLP, kept where its logit is positive
GATE_KWTA = 1  # k-winners-take-all of a pooled linear map, the winners' values as multipliers
GATE_GIVEN = 2  # multipliers decided outside the call
GATE_INSTANCE = 3  # per-sample channel-norm threshold on conv1's output


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


def _gated_macs(args: tuple, kwargs: dict, out: object) -> int:
    """MAC rule of ``torch.ops.dynnet.gated_pair3x3``: the pair's (:func:`block_pair_macs`) plus its gate's
    matrix-vector products (``J·C_in + C·J`` for the pooled MLP, ``C·C_in`` for k-WTA, none for given multipliers),
    as the counter counts the Python gates' ``addmm`` (the pooling is not a MAC); for :data:`GATE_INSTANCE` every
    channel of ``conv1`` and the ``k`` kept inputs of ``conv2``."""
    x, kind, gw1, gw2, w1, w2 = args[0], args[1], args[2], args[4], args[7], args[9]
    y, _, kept = out  # type: ignore[misc]
    shortcut = args[14] if len(args) > 14 else kwargs.get("shortcut_w")
    if kind == GATE_INSTANCE:  # conv1 on every channel, conv2 on the kept ones
        plane = 9 * y.shape[2] * y.shape[3]
        extra = 0 if shortcut is None else shortcut.numel() * y.shape[2] * y.shape[3]
        return extra + w1.shape[0] * x.shape[1] * plane + int(kept) * w2.shape[0] * plane
    gate = {GATE_MLP: gw1.numel() + gw2.numel(), GATE_KWTA: gw1.numel()}.get(kind, 0)
    return gate + block_pair_macs(x, w2, y, int(kept), shortcut)


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
    compiled kernel does not apply (then the caller runs the gate and
    :func:`~dynnet.kernels.channel.sliced_pair_single`).

    At batch 1 the gate's few small ops (pooling, two matrix-vector products, a threshold or a top-k, a scatter)
    cost about as much as the kept channels' convolutions; here they run inside the kernel call.

    Args:
        x: Tensor[1, C_in, H, W].
        gate: ``(kind, gw1, gb1, gw2, gb2, k)``:

            * :data:`GATE_MLP`: ``h = relu(gw1 · mean_hw(x) + gb1)`` (gw1 Tensor[J, C_in] with the gate's BN folded),
              ``logits = gw2 · h + gb2`` (gw2 Tensor[C, J]); channel ``c`` is kept, multiplier 1, where
              ``logits[c] > 0`` (``k`` unused);
            * :data:`GATE_KWTA`: ``g = relu(gw1 · mean_hw|x| + gb1)`` (gw1 Tensor[C, C_in]); the ``k`` largest
              ``g`` are kept (ties: lowest index) with multiplier ``g``; ``gw2``, ``gb2`` are unused;
            * :data:`GATE_GIVEN`: the multipliers ``gw1`` Tensor[C] (a decision made outside the block); with
              ``k != 0`` they are binary (non-zero = kept with multiplier 1);
            * :data:`GATE_INSTANCE`: ``conv1`` computes every channel and ``conv2`` reads the channels whose RMS
              over the plane exceeds ``gw1[0]`` (Tensor[1]) times the mean RMS over channels and is non-zero;
              ``k`` is then ``conv2``'s inputs.
        w1, b1, w2, b2, spec1, spec2: as :func:`~dynnet.kernels.channel.sliced_pair` (BN folded).
        residual, relu: as :func:`~dynnet.kernels.channel.sliced_pair_single`.

    Returns:
        ``(y, scale, k)``: Tensor[1, C_out, H', W'], the multipliers used Tensor[C] (the 0/1 decision for
        :data:`GATE_INSTANCE`) and the kept count, or ``None``.
    """
    kind, gw1, gb1, gw2, gb2, k, _ = gate
    if not pair_operands_ok(x, w1, b1, w2, b2, spec1, spec2) or not operands_ok(x, gw1, gb1, gw2, gb2):
        return None
    if residual is not None and not residual_ok(residual):
        return None
    res = None if residual is None else residual.contiguous()
    op = compiled_op("gated_pair3x3", _gated_macs)
    return op(x.contiguous(), kind, gw1, gb1, gw2, gb2, k, w1, b1, w2, b2, spec1.stride[0], res, relu)


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
    if not all(type(t) in PLAIN and t.dtype == torch.float32 and t.is_contiguous() and t.is_cpu for t in operands):
        return None
    if not pair_geometry_ok(spec1, spec2, w1, w2) or native.load() is None:
        return None
    weights = (w1, b1, w2, b2, spec1.stride[0])
    if gate is None:
        return compiled_op("gated_pair3x3", _gated_macs), weights, None
    gw1, gb1, gw2, gb2 = (t.detach() for t in operands[4:])
    return compiled_op("gated_pair3x3", _gated_macs), weights, (gate.kind, gw1, gb1, gw2, gb2, gate.k)
