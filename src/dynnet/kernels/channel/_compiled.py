"""Access to the compiled batch-1 channel kernels (``torch.ops.dynnet.*`` of :mod:`dynnet.kernels.native`).

What every compiled channel call shares: the operand checks (one float32 CPU sample, NCHW-contiguous float32
weights, nothing to differentiate), the geometry the kernels handle (3×3, padding 1, stride 1 or 2), the dispatcher
ops with their MAC rules registered on first use (:func:`compiled_op`), and the input-sliced 3×3 convolution
(:func:`native_conv3x3_in`). Imports :mod:`dynnet.kernels.channel._spec` only, within the package.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch._ops import OpOverloadPacket

from dynnet.kernels import native
from dynnet.kernels.channel._spec import ConvSpec

__all__ = [
    "PLAIN",
    "STRIDE2",
    "UNIT",
    "block_pair_macs",
    "compiled_op",
    "native_conv3x3_in",
    "native_pair_usable",
    "operands_ok",
    "pair_geometry_ok",
    "pair_operands_ok",
    "residual_ok",
]

# The tensor types the compiled kernels take (subclasses may override ops the kernels would bypass).
PLAIN = (torch.Tensor, torch.nn.Parameter)
# The geometries of the compiled 3×3 convolutions: stride 1 or 2, padding 1, no dilation.
UNIT = ConvSpec((1, 1), (1, 1), (1, 1))
STRIDE2 = ConvSpec((2, 2), (1, 1), (1, 1))

_USABLE: dict[tuple, bool] = {}
_OPS: dict[str, OpOverloadPacket] = {}


def compiled_op(name: str, rule: Callable[[tuple, dict, object], int]) -> OpOverloadPacket:
    """``torch.ops.dynnet.<name>``, a dispatcher op so that the MAC counter sees it, with ``rule`` registered as
    its MAC rule (``rule(args, kwargs, out) -> int``) on first use. The extension must be loaded."""
    op = _OPS.get(name)
    if op is None:
        from dynnet.macs import MAC_RULES, register_mac_rule

        op = _OPS[name] = getattr(torch.ops.dynnet, name)
        if op not in MAC_RULES:
            register_mac_rule(op)(rule)
    return op


def native_pair_usable(spec1: ConvSpec, spec2: ConvSpec, w1: Tensor, w2: Tensor) -> bool:
    """Whether the compiled batch-1 pair kernel (``sliced_pair3x3``) handles this pair of convolutions: both 3×3
    with padding 1 and no dilation, the first of stride 1 or 2, the second of stride 1, float32 on CPU, and the
    extension is available.

    Args:
        spec1, spec2: the two convolutions' geometry.
        w1, w2: their weights, Tensor[C, C_in, 3, 3] and Tensor[C_out, C, 3, 3].
    """
    return pair_geometry_ok(spec1, spec2, w1, w2) and native.load() is not None


def pair_geometry_ok(spec1: ConvSpec, spec2: ConvSpec, w1: Tensor, w2: Tensor) -> bool:
    """Whether the pair's geometry and weights suit the compiled kernels (:func:`native_pair_usable` without the
    extension check)."""
    return (
        spec1 in (UNIT, STRIDE2)
        and spec2 == UNIT
        and w1.shape[2:] == (3, 3)
        and w2.shape[2:] == (3, 3)
        and w1.dtype == torch.float32
        and w1.device.type == "cpu"
    )


def pair_operands_ok(
    x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, spec1: ConvSpec, spec2: ConvSpec
) -> bool:
    """Whether the compiled pair kernels can run this batch-1 pair: inference (nothing to differentiate), plain
    float32 CPU tensors, NCHW-contiguous weights (as a block that caches folded weights keeps them when the
    extension is present), 3×3 / padding 1 convolutions of stride 1 or 2, then 1.

    Runs once per block per image, so the checks are ordered cheapest first and the geometry check is memoised.

    Args:
        x: Tensor[1, C_in, H, W].
        w1, b1, w2, b2: the pair's BN-folded weights and biases (see :func:`~dynnet.kernels.channel.sliced_pair`).
        spec1, spec2: the two convolutions' geometry.
    """
    if not operands_ok(x, w1, b1, w2, b2):
        return False
    key = (spec1, spec2, w1.shape[2], w1.shape[3], w2.shape[2], w2.shape[3], type(w1), type(w2), w1.device.type)
    usable = _USABLE.get(key)
    if usable is None:
        usable = _USABLE[key] = type(w1) in PLAIN and type(w2) in PLAIN and pair_geometry_ok(spec1, spec2, w1, w2)
    return usable and native.load() is not None


def operands_ok(x: Tensor, *operands: Tensor) -> bool:
    """What every compiled channel kernel needs: one sample of a plain float32 CPU input x Tensor[1, C, H, W],
    float32 NCHW-contiguous weights and biases, and nothing to differentiate (they have no backward)."""
    if x.shape[0] != 1 or x.dtype != torch.float32 or x.device.type != "cpu" or type(x) not in PLAIN:
        return False
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    return all(t.dtype == torch.float32 and t.is_contiguous() and not (grad and t.requires_grad) for t in operands)


def residual_ok(residual: Tensor) -> bool:
    """Whether a block's residual Tensor[1, C_out, H', W'] can enter a compiled call's epilogue."""
    return (
        residual.dtype == torch.float32
        and residual.device.type == "cpu"
        and type(residual) in PLAIN
        and not (torch.is_grad_enabled() and residual.requires_grad)
    )


def block_pair_macs(x: Tensor, w2: Tensor, y: Tensor, kept: int, shortcut_w: Tensor | None) -> int:
    """MACs of a compiled block call's convolutions: ``kept`` inner channels of the 3×3 pair (input x
    Tensor[1, C_in, H, W], w2 Tensor[C_out, C, 3, 3], output y Tensor[1, C_out, H', W']) and the 1×1 projection
    shortcut ``shortcut_w`` Tensor[C_out, C_in] when the call computes it."""
    extra = 0 if shortcut_w is None else shortcut_w.numel() * y.shape[2] * y.shape[3]
    return extra + kept * (x.shape[1] + w2.shape[0]) * 9 * y.shape[2] * y.shape[3]


def _conv3x3_in_macs(args: tuple, kwargs: dict, out: object) -> int:
    """MAC rule of ``torch.ops.dynnet.conv3x3_in``: ``k · C_out · 9 · H_out · W_out`` (``k`` the channels read)."""
    y, kept = out  # type: ignore[misc]
    return int(kept) * y.shape[1] * 9 * y.shape[2] * y.shape[3]


def native_conv3x3_in(
    x: Tensor, w: Tensor, b: Tensor, active: Tensor | None, spec: ConvSpec
) -> tuple[Tensor, int] | None:
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
    if type(w) not in PLAIN or not operands_ok(x, w, b):
        return None
    if spec not in (UNIT, STRIDE2) or w.shape[2:] != (3, 3) or native.load() is None:
        return None
    act = x.new_ones(x.shape[1]) if active is None else active.reshape(-1).to(torch.float32).contiguous()
    return compiled_op("conv3x3_in", _conv3x3_in_macs)(x.contiguous(), w, b, act, spec.stride[0])
