"""Partial-sum gating: a convolution's base input channels decide where the rest of its input is added.

Channel gating (Hua et al.) computes ``p = conv(x_base; W_base) + b`` for every output and adds
``conv(x_rest; W_rest)`` only where a gate on ``p`` is on. Two engines: :func:`gated_rest_conv` (exact MACs, one
matrix-vector product per output channel) and :func:`gated_rest_add_` (dense channels and a gather–GEMM) for a
batch, and the compiled batch-1 block with per (output channel, 4 × 4 tile) decisions (:func:`tile_gated_pair_op`,
reference :func:`tile_gated_pair_reference`). Imports :mod:`~dynnet.kernels.channel._spec` and
:mod:`~dynnet.kernels.channel._compiled`, within the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._ops import OpOverloadPacket

from dynnet.kernels import native
from dynnet.kernels.channel._compiled import compiled_op
from dynnet.kernels.channel._spec import ConvSpec

__all__ = [
    "TILE",
    "gated_rest_add_",
    "gated_rest_conv",
    "tile_gated_pair_macs",
    "tile_gated_pair_op",
    "tile_gated_pair_reference",
    "tile_gated_rest_add_",
    "tiles_on",
    "upsample_tiles",
]


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


def tiles_on(p: Tensor, threshold: Tensor, tile: int) -> Tensor:
    """Per (sample, output channel, ``tile × tile`` window) decisions on a partial sum: the window's mean of ``p``
    (over its positions inside the map) exceeds the channel's threshold — the compiled batch-1 block's rule
    (:func:`tile_gated_pair_op`).

    Args:
        p: Tensor[N, C, H, W] the base partial sum.
        threshold: Tensor[C], on the window mean of ``p``.
        tile: the window side (1: per position).

    Returns:
        Tensor[N, C, ceil(H / tile), ceil(W / tile)] bool.
    """
    pooled = p if tile == 1 else F.avg_pool2d(p, tile, ceil_mode=True)
    return pooled > threshold.view(1, -1, 1, 1)


def upsample_tiles(on: Tensor, tile: int, size: tuple[int, int]) -> Tensor:
    """Tile decisions Tensor[N, C, th, tw] broadcast to their positions: Tensor[N, C, *size] (``size`` at most
    ``(th · tile, tw · tile)``; the last row and column of windows may be cut)."""
    if tile == 1:
        return on
    n, c, th, tw = on.shape
    full = on[:, :, :, None, :, None].expand(n, c, th, tile, tw, tile).reshape(n, c, th * tile, tw * tile)
    return full[:, :, : size[0], : size[1]]


def tile_gated_rest_add_(p: Tensor, x_rest: Tensor, w_rest: Tensor, on: Tensor, tile: int, spec: ConvSpec) -> Tensor:
    """``p += upsample(on) · conv(x_rest; w_rest)`` for per-window decisions, over the output channels that some
    window of the batch keeps (one dense convolution of their weight rows; channels no window keeps cost nothing).

    The batch path of channel gating at inference with nothing recording: the decisions stay at window resolution
    (broadcast into the multiply when the map is a whole number of windows), so no full-resolution mask is made.
    Computes the same values as :func:`gated_rest_add_` with ``dense_density = 0`` on the upsampled mask.

    Args:
        p: Tensor[N, C_out, H', W'] the base partial sum, updated in place and returned.
        x_rest: Tensor[N, C_rest, H, W].
        w_rest: Tensor[C_out, C_rest, k, k].
        on: Tensor[N, C_out, ceil(H' / tile), ceil(W' / tile)] bool (:func:`tiles_on`).
        tile: the window side.
        spec: the convolution's geometry.

    Returns:
        ``p``.
    """
    cout = p.shape[1]
    kept = on.flatten(2).any(2).any(0)  # Tensor[C_out]: some window of the batch keeps the channel
    idx = kept.nonzero().squeeze(1)
    k = idx.numel()
    if k == 0:
        return p
    if k < cout:
        w_rest, on = w_rest.index_select(0, idx), on.index_select(1, idx)
    r = spec.conv(x_rest, w_rest)  # Tensor[N, k, H', W']
    _mul_windows_(r, on.to(r.dtype), tile)
    return p.add_(r) if k == cout else p.index_add_(1, idx, r)


def _mul_windows_(r: Tensor, g: Tensor, tile: int) -> None:
    """``r *= upsample_tiles(g)`` in place, broadcasting ``g`` over the whole windows through a strided view of
    ``r`` (any memory format) and upsampling only the cut last row and column of windows."""
    if tile == 1:
        r.mul_(g)
        return
    n, k, h, w = r.shape
    th, tw = h // tile, w // tile  # whole windows
    if th and tw:
        sn, sc, sh, sw = r.stride()
        core = r.as_strided((n, k, th, tile, tw, tile), (sn, sc, tile * sh, sh, tile * sw, sw), r.storage_offset())
        core.mul_(g[:, :, :th, None, :tw, None])
    if h > th * tile:  # the last, cut row of windows (every column)
        r[:, :, th * tile :].mul_(upsample_tiles(g[:, :, th:], tile, (h - th * tile, w)))
    if w > tw * tile and th:  # the last, cut column of windows (rows of whole windows)
        r[:, :, : th * tile, tw * tile :].mul_(upsample_tiles(g[:, :, :th, tw:], tile, (th * tile, w - tw * tile)))


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


def _tile_gated_macs(args: tuple, kwargs: dict, out: object) -> int:
    """MAC rule of ``torch.ops.dynnet.tile_gated_pair3x3``: :func:`tile_gated_pair_macs` of the call."""
    x, w1, base1, w2, base2 = args[0], args[1], args[3], args[4], args[6]
    shortcut = args[9] if len(args) > 9 else kwargs.get("shortcut_w")
    y, _, _, e1, e2 = out  # type: ignore[misc]
    return tile_gated_pair_macs(x, w1, base1, w2, base2, y, int(e1), int(e2), shortcut)


def tile_gated_pair_op() -> OpOverloadPacket | None:
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
    return compiled_op("tile_gated_pair3x3", _tile_gated_macs)


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
