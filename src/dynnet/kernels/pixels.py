"""Pixels as rows: the geometry the pixel engine's gathers compute with.

Output sizes and receptive fields of a convolution on the pixel grid, the active positions of a mask
(``Tensor[P, 3]`` long ``(n, row, col)``, in ``mask.nonzero()`` order), and channels-last rows with their
position → row lookups (``Tensor[N, H, W]`` long, -1 where a position reads as zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEPTHWISE_CHUNK_ELEMENTS",
    "active_positions",
    "channels_last_rows",
    "conv_out_size",
    "gather_depthwise_rows",
    "input_lookup",
    "receptive_mask",
    "rows_lookup",
    "square_param",
    "tap_sources",
]


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def square_param(v: int | tuple[int, int]) -> int:
    """The one value of a square kernel, stride, padding or dilation (an int, or a pair of equal ints)."""
    if isinstance(v, tuple):
        if v[0] != v[1]:
            raise ValueError(f"only square kernels, strides, paddings and dilations are supported, got {v}")
        return int(v[0])
    return int(v)


def receptive_mask(
    mask: Tensor, kernel: int, stride: int, padding: int, dilation: int, in_size: tuple[int, int]
) -> Tensor:
    """The input positions that the active output positions of a convolution read.

    Works on bool masks and on float masks (straight-through decisions): for floats it is the max over
    the receptive fields, so gradients flow to the output mask (DynConv's dilated mask is
    ``max_pool2d(mask, 3, 1, 1)``, which this equals for a 3×3, stride-1 convolution).

    Args:
        mask: Tensor[N, Ho, Wo] output mask (bool or float in [0, 1]).
        kernel, stride, padding, dilation: the convolution's geometry (square).
        in_size: ``(H, W)`` of the convolution's input.

    Returns:
        Tensor[N, H, W] of ``mask``'s dtype.
    """
    n, ho, wo = mask.shape
    h, w = in_size
    is_bool = mask.dtype == torch.bool
    m = mask.float() if is_bool else mask
    if kernel == 1 and stride == 1 and padding == 0:
        return mask
    if stride == 1 and dilation == 1 and 2 * padding == kernel - 1 and (h, w) == (ho, wo):
        out = F.max_pool2d(m.unsqueeze(1), kernel, 1, padding).squeeze(1)
        return out > 0.5 if is_bool else out
    canvas_h = max(h + 2 * padding, (ho - 1) * stride + (kernel - 1) * dilation + 1)
    canvas_w = max(w + 2 * padding, (wo - 1) * stride + (kernel - 1) * dilation + 1)
    hu, wu = (ho - 1) * stride + 1, (wo - 1) * stride + 1
    if stride > 1:  # spread the output positions onto the input grid (a fresh tensor: autograd-safe)
        spread = m.new_zeros((n, hu, wu))
        spread[:, ::stride, ::stride] = m
    else:
        spread = m
    shifted = []
    for kh in range(kernel):
        for kw in range(kernel):
            r0, c0 = kh * dilation, kw * dilation
            shifted.append(F.pad(spread, (c0, canvas_w - c0 - wu, r0, canvas_h - r0 - hu)))
    canvas = torch.stack(shifted).amax(0)
    out = canvas[:, padding : padding + h, padding : padding + w]
    return out > 0.5 if is_bool else out


def active_positions(mask: Tensor) -> Tensor:
    """Tensor[P, 3] long ``(n, row, col)`` of the active entries of a Tensor[N, H, W] bool mask."""
    return mask.nonzero()


def input_lookup(n: int, h: int, w: int, device: torch.device | None = None) -> Tensor:
    """Tensor[N, H, W] long: the row of every position in ``x.permute(0, 2, 3, 1).reshape(-1, C)``."""
    return torch.arange(n * h * w, device=device).view(n, h, w)


def rows_lookup(positions: Tensor, size: tuple[int, int, int], *, fill: int = -1) -> Tensor:
    """Tensor[N, H, W] long: ``i`` at ``positions[i]`` (Tensor[P, 3]), ``fill`` elsewhere (positions that read
    as zero: -1, or the index of a zero row)."""
    lookup = torch.full(size, fill, dtype=torch.long, device=positions.device)
    lookup[positions[:, 0], positions[:, 1], positions[:, 2]] = torch.arange(
        positions.shape[0], device=positions.device
    )
    return lookup


def channels_last_rows(x: Tensor) -> tuple[Tensor, int]:
    """Tensor[N, C, H, W] → ``(Tensor[N·H·W + 1, C], N·H·W)``: the pixels as rows, plus a zero row at the end.

    The rows of pixel ``(n, h, w)`` is ``(n·H + h)·W + w`` (:func:`input_lookup`); the last row is the
    ``zero_row`` of :func:`~dynnet.kernels.spatial.gather_conv_rows`. One copy, as
    ``x.permute(0, 2, 3, 1).contiguous()`` would make.
    """
    n, c, h, w = x.shape
    r = n * h * w
    buf = x.new_empty((r + 1, c))
    buf[:r].view(n, h, w, c).copy_(x.permute(0, 2, 3, 1))
    buf[r].zero_()
    return buf, r


def tap_sources(
    lookup: Tensor, positions: Tensor, *, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> Tensor:
    """Tensor[P·k·k] long: for every output position (Tensor[P, 3]) and tap of a ``k × k`` convolution, the row of
    ``lookup`` (Tensor[N, H, W] long) it reads; -1 where it reads zero (outside the image or a -1 entry)."""
    p = positions.shape[0]
    h, w = lookup.shape[1:]
    hp, wp = h + 2 * padding, w + 2 * padding
    if padding:
        lookup = F.pad(lookup, (padding, padding, padding, padding), value=-1)
    base = positions[:, 0] * (hp * wp) + positions[:, 1] * (stride * wp) + positions[:, 2] * stride
    ar = torch.arange(kernel, device=lookup.device) * dilation
    offsets = (ar.view(kernel, 1) * wp + ar.view(1, kernel)).reshape(-1)
    return lookup.reshape(-1).index_select(0, (base.view(p, 1) + offsets.view(1, -1)).reshape(-1))


DEPTHWISE_CHUNK_ELEMENTS = 1 << 20
"""Elements of the gathered ``Tensor[rows, k·k, C]`` made at a time by :func:`gather_depthwise_rows` (4 MB)."""


def gather_depthwise_rows(
    rows: Tensor,
    lookup: Tensor,
    weight: Tensor,
    positions: Tensor,
    *,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    bias: Tensor | None = None,
) -> Tensor:
    """A depthwise convolution (``groups = C``) at the given output positions, reading its input from compact rows:
    each position's ``k·k`` input rows are gathered and weighted channel by channel.

    Args:
        rows: Tensor[R, C] input rows (channels-last pixels).
        lookup: Tensor[N, H, W] long, the row of each input position, -1 for zero positions.
        weight: Tensor[C, 1, k, k] (batch norm folded in).
        positions: Tensor[P, 3] long ``(n, oh, ow)`` output positions.
        kernel, stride, padding, dilation: the convolution's geometry.
        bias: Tensor[C] or ``None``.

    Returns:
        Tensor[P, C]. Costs exactly ``P·k·k·C`` MACs.
    """
    c, taps, p = rows.shape[1], kernel * kernel, positions.shape[0]
    if weight.shape != (c, 1, kernel, kernel):
        raise ValueError(f"a depthwise weight over {c} channels is Tensor[{c}, 1, {kernel}, {kernel}], got "
                         f"{tuple(weight.shape)}")  # fmt: skip
    out = rows.new_empty((p, c))
    if p == 0:
        return out
    src = tap_sources(lookup, positions, kernel=kernel, stride=stride, padding=padding, dilation=dilation)
    valid = (src >= 0).to(rows.dtype).view(p, taps, 1)
    src = src.clamp_min(0)
    rows = rows.contiguous() if rows.shape[0] else rows.new_zeros((1, c))
    w = weight.reshape(c, taps).t().unsqueeze(0)  # Tensor[1, k·k, C]
    step = max(1, DEPTHWISE_CHUNK_ELEMENTS // (taps * c))
    for i in range(0, p, step):
        j = min(p, i + step)
        cols = rows.index_select(0, src[i * taps : j * taps]).view(j - i, taps, c)
        torch.mul(cols, valid[i:j], out=cols)
        torch.sum(cols * w, dim=1, out=out[i:j])
    return out if bias is None else out.add_(bias)
