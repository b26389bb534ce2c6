"""Pixel-wise sparse convolution: compute a convolution only at the active output positions of a mask.

The fast path is a gather–GEMM–scatter ("im2col over active pixels"):

1. the input is laid out as channels-last rows ``Tensor[R, C]`` with a ``lookup`` Tensor[N, H, W] from
   position to row (-1: reads as zero — the padding, or positions a previous sparse stage did not compute),
   so intermediate results stay compact and no padded copy is ever made;
2. for the ``P`` active output positions, the ``k·k`` input rows each needs are gathered with one
   ``index_select`` into ``Tensor[P, k·k·C]`` (0 MACs: a copy);
3. one GEMM (``addmm``, with batch norm folded into the weight and bias) with the weight reshaped to
   ``Tensor[k·k·C, C_out]`` gives ``Tensor[P, C_out]``: exactly ``P·k·k·C·C_out`` MACs (what the aten rule counts);
4. the rows are added back onto the dense tensor (``index_select`` + ``index_copy``, 0 MACs).

:func:`sparse_conv2d` falls back to the dense convolution when the mask is denser than a crossover
density, which :func:`calibrate_crossover` measures per layer shape (wall clock, so it is never run
implicitly). The pure-PyTorch references that define correctness are :func:`masked_conv2d_reference`
(dense convolution, then the active rows) and the masked mode of the recipes.

Shapes: ``mask`` is ``Tensor[N, Ho, Wo]`` bool on the *output* grid; rows follow the order of
``mask.nonzero()`` (batch, then row, then column).

The GEMM (:mod:`dynnet.kernels.gemm`: oneDNN's matmul, weight matrices) and the pixel geometry
(:mod:`dynnet.kernels.pixels`: output sizes, receptive fields, rows and lookups) live beside this module, which
re-exports their public names.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dynnet.kernels import native
from dynnet.kernels.gemm import (
    cached_weight_matrix,
    matmul_rows,
    onednn_usable,
    packed_weight,
    plain_cpu,
    weight_matrix,
)
from dynnet.kernels.pixels import (
    active_positions,
    channels_last_rows,
    conv_out_size,
    input_lookup,
    receptive_mask,
    rows_lookup,
    square_param,
    tap_sources,
)

__all__ = [
    "CROSSOVERS",
    "SparseConvResult",
    "active_positions",
    "calibrate_crossover",
    "channels_last_rows",
    "conv_out_size",
    "gather_conv2d",
    "gather_conv_image",
    "gather_conv_rows",
    "input_lookup",
    "masked_conv2d_reference",
    "matmul_rows",
    "pixel_chain",
    "receptive_mask",
    "rows_lookup",
    "scatter_add_rows",
    "sparse_conv2d",
    "weight_matrix",
]


_OPS: dict[str, object] = {}


def _op_with_rule(name: str, macs: Callable[[tuple], int]):
    """``torch.ops.dynnet.<name>`` with ``macs(args)`` registered as its MAC rule, on first use."""
    op = _OPS.get(name)
    if op is not None:
        return op
    from dynnet.macs import MAC_RULES, register_mac_rule

    op = getattr(torch.ops.dynnet, name)
    if op not in MAC_RULES:
        register_mac_rule(op)(lambda args, kwargs, out: macs(args))
    _OPS[name] = op
    return op


def _gather_gemm_op():
    """``torch.ops.dynnet.gather_gemm`` (chunks gathered and multiplied in parallel) with its MAC rule,
    ``P · K · C_out`` for the P positions (the weight's ``K · C_out``)."""
    return _op_with_rule("gather_gemm", lambda args: args[2].shape[0] * args[3].numel())


def _parallel_gather_gemm(
    rows: Tensor,
    lookup: Tensor | None,
    positions: Tensor,
    wmat: Tensor,
    bias: Tensor | None,
    chunk: int,
    geometry: tuple[int, int, int, int],
) -> Tensor | None:
    """The gather–GEMM with its chunks run in parallel (``torch.ops.dynnet.gather_gemm``: each thread gathers and
    multiplies whole chunks), or ``None`` when it does not apply: one thread, a single chunk (then oneDNN's own
    threads split the one GEMM), or no oneDNN matmul for these tensors. On 2 threads the sparse paths at batch 16
    (C = 128, 28×28) ran 1.4–2.0× their one-thread speed, against 1.3–1.5× with each chunk split over the threads
    (``benchmarks/results/spatial/kernels_wall.json``)."""
    if torch.get_num_threads() < 2 or positions.shape[0] <= chunk or not onednn_usable(rows, wmat, bias):
        return None
    weight = packed_weight(wmat)
    return _gather_gemm_op()(rows, lookup, positions, weight, bias, wmat.shape[1], *geometry, chunk)


def _pixel_chain_op():
    """``torch.ops.dynnet.pixel_chain`` with its MAC rule, ``Σ_i |mask_i| · |W_i|``."""
    return _op_with_rule(
        "pixel_chain", lambda args: sum(int(m.sum()) * w.numel() for m, w in zip(args[1], args[2], strict=True))
    )


SMALL_GEMM_MAX_CHANNELS = 32
"""Stages of :func:`pixel_chain` with at most this many output channels multiply chunks of at most 2^20 MACs with
dynnet's own small GEMM (a few µs) instead of oneDNN's matmul, which spends ~14 µs setting up each call (at most
32; 0 turns it off)."""

PIXEL_CHAIN_MIN_ROWS = 32
"""Fewest rows a thread's chunk gets in :func:`pixel_chain` before the rows go to one chunk (oneDNN's threads)."""


def pixel_chain(
    x: Tensor,
    masks: list[Tensor],
    mats: list[Tensor],
    biases: list[Tensor | None],
    geometries: list[tuple[int, int, int, int]],
    relus: list[bool],
) -> tuple[Tensor, Tensor, Tensor] | None:
    """A chain of convolutions (each ``relu?(conv(h) + bias)``), every stage computed only at its mask's positions,
    in one compiled call (``torch.ops.dynnet.pixel_chain``); ``None`` when the call does not apply (no compiled
    extension, not float32 CPU, a gradient to record, a non-bool mask). The reference is the gather–GEMM of
    :func:`gather_conv_image` / :func:`gather_conv_rows` stage by stage.

    Per stage the mask becomes positions, counts and a position → row lookup in one pass, and every thread gathers
    and multiplies (oneDNN's matmul with bias and ReLU fused; for small chunks of stages of at most
    :data:`SMALL_GEMM_MAX_CHANNELS` output channels dynnet's own small GEMM) whole chunks of rows. Intermediate rows
    stay compact.

    Args:
        x: Tensor[N, C, H, W] input (read in place when channels-last).
        masks: per stage, Tensor[N, H_i, W_i] bool output mask (each stage must compute what the next reads:
            :func:`dynnet.kernels.chain.stage_masks`).
        mats, biases: per stage, Tensor[k·k·C_i, C_{i+1}] (:func:`weight_matrix`) and Tensor[C_{i+1}] or ``None``.
        geometries: per stage ``(kernel, stride, padding, dilation)``.
        relus: per stage, whether a ReLU follows.

    Returns:
        ``(rows, positions, executed)``: Tensor[P_L, C_L] the last stage's rows at its positions Tensor[P_L, 3]
        (``masks[-1].nonzero()`` order), and Tensor[N] float64 MACs executed per sample (exactly
        ``Σ_i |mask_i[n]| · |W_i|``).
    """
    if (
        native.load() is None
        or x.dtype != torch.float32
        or not onednn_usable(x, *mats, *biases)
        or any(m.dtype != torch.bool or not plain_cpu(m) for m in masks)
    ):
        return None
    image = x.permute(0, 2, 3, 1).contiguous()
    # Narrow layers: oneDNN's plain Tensor[C_out, K] (a view), which the call also reads for its own small GEMM on
    # small chunks; others: oneDNN's weight (prepacked when seen again).
    own = [w.shape[1] <= SMALL_GEMM_MAX_CHANNELS for w in mats]
    weights = [w.t().contiguous() if o else packed_weight(w) for w, o in zip(mats, own, strict=True)]
    flags = [int(r) | (2 if o else 0) for r, o in zip(relus, own, strict=True)]
    geometry = [v for g in geometries for v in g]
    call = _pixel_chain_op() if native.observed() else native.direct("pixel_chain")
    return call(
        image,
        [m.contiguous() for m in masks],
        weights,
        list(biases),
        [w.shape[1] for w in mats],
        geometry,
        flags,
        GATHER_CHUNK_ELEMENTS,
        PIXEL_CHAIN_MIN_ROWS,
    )


GATHER_CHUNK_ELEMENTS = 1 << 19
"""Elements of the gathered ``Tensor[rows, k·k·C]`` made at a time by :func:`gather_conv_rows` (2 MB in float32)."""

CROSSOVERS: dict[tuple[int, ...], float] = {}
"""Measured density above which the dense convolution is faster, keyed by
``(C_in, C_out, k, stride, H, W, N)``; filled by :func:`calibrate_crossover`."""

DEFAULT_CROSSOVER = 1.0
"""Without a calibration, the gather path runs at every density below 1 (the sparse kernel is always used)."""


def _gather_chunk(width: int) -> int:
    """Rows of gathered matrix made at a time for rows of ``width`` elements: about 2 MB, so that a chunk stays
    in cache between the gather and the GEMM and no allocation is large enough to be a fresh mmap (page faults on
    every call)."""
    return max(64, GATHER_CHUNK_ELEMENTS // width)


def _chunked_gemm(
    p: int, chunk: int, gather: Callable[[int, int], Tensor], wmat: Tensor, bias: Tensor | None
) -> Tensor:
    """Tensor[p, C_out]: ``gather(i, j) @ wmat + bias`` over the row ranges ``[i, j)`` of ``chunk`` rows."""
    outs = [matmul_rows(gather(i, min(p, i + chunk)), wmat, bias) for i in range(0, p, chunk)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def compiled_kernels(data: Tensor, *indices: Tensor):
    """The compiled extension when its copy kernels (gathers, tile copies) can read ``data`` with these index
    tensors (float32 and int64 CPU tensors, nothing to differentiate), else ``None`` (the pure-PyTorch path)."""
    if (
        data.dtype != torch.float32
        or not plain_cpu(data)
        or (torch.is_grad_enabled() and data.requires_grad)
        or any(t.dtype != torch.long or not plain_cpu(t) for t in indices)
    ):
        return None
    return native.load()


def gather_conv_rows(
    rows: Tensor,
    lookup: Tensor,
    wmat: Tensor,
    positions: Tensor,
    *,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    bias: Tensor | None = None,
    zero_row: int | None = None,
) -> Tensor:
    """The convolution at the given output positions, reading its input from compact rows.

    This is the fast path: the ``k·k`` input rows of every active output position are gathered into
    ``Tensor[P, k·k·C]`` and one GEMM (:func:`matmul_rows`, with the bias, e.g. folded batch norm) computes them.
    No padded copy of the input is made: positions outside the image or not present in ``rows`` read as zero.
    The gather is the compiled ``gather_im2col`` (:mod:`dynnet.kernels.native`: lookup, tap arithmetic and row
    copies in one pass) when it is available and nothing needs a gradient, else one ``index_select`` over
    indices computed with tensor ops (the reference; both give identical rows).

    Args:
        rows: Tensor[R, C] input rows (channels-last pixels).
        lookup: Tensor[N, H, W] long, the row of each input position, -1 for zero positions.
        wmat: Tensor[k·k·C, C_out] (:func:`weight_matrix`).
        positions: Tensor[P, 3] long ``(n, oh, ow)`` output positions.
        kernel, stride, padding, dilation: the convolution's geometry.
        bias: Tensor[C_out] or ``None``.
        zero_row: index of an all-zero row of ``rows``. Given, zero positions (padding, -1 in ``lookup``) read
            that row, which saves zeroing them after the gather; ``None``: they are zeroed after the gather.

    Returns:
        Tensor[P, C_out]. Costs exactly ``P·k·k·C·C_out`` MACs.
    """
    c = rows.shape[1]
    p = positions.shape[0]
    if wmat.shape[0] != kernel * kernel * c:
        raise ValueError(f"weight matrix of {wmat.shape[0]} rows does not match k·k·C = {kernel * kernel * c}")
    if p == 0:
        return rows.new_zeros((0, wmat.shape[1]))
    taps = kernel * kernel
    chunk = _gather_chunk(taps * c)
    ext = compiled_kernels(rows, lookup, positions)
    if ext is not None:
        rows, lookup = rows.contiguous(), lookup.contiguous()
        geometry = (kernel, stride, padding, dilation)
        out = _parallel_gather_gemm(rows, lookup, positions, wmat, bias, chunk, geometry)
        if out is not None:
            return out
        return _chunked_gemm(
            p, chunk, lambda i, j: ext.gather_im2col(rows, lookup, positions, i, j, *geometry), wmat, bias
        )
    src = tap_sources(lookup, positions, kernel=kernel, stride=stride, padding=padding, dilation=dilation)
    # A row-major source makes index_select a row copy (a column-major view, e.g. a permuted batch of one,
    # would be gathered element by element, ten times slower).
    rows = rows.contiguous() if rows.shape[0] else rows.new_zeros((1, c))  # no rows: everything reads zero
    if zero_row is not None:
        src, valid = torch.where(src < 0, zero_row, src), None
    else:
        valid = src >= 0
        src = src.clamp_min(0)
        if bool(valid.all()):
            valid = None

    def gather(start: int, stop: int) -> Tensor:
        cols = rows.index_select(0, src[start * taps : stop * taps])
        if valid is not None:
            # A multiply, not masked_fill_: a broadcast masked_fill_ is many times slower on CPU.
            cols.mul_(valid[start * taps : stop * taps].unsqueeze(1).to(cols.dtype))
        return cols.view(stop - start, taps * c)

    return _chunked_gemm(p, chunk, gather, wmat, bias)


def gather_conv2d(
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """``conv2d(x, weight)`` evaluated only where ``mask`` is set.

    Args:
        x: Tensor[N, C, H, W].
        weight: Tensor[C_out, C, k, k].
        mask: Tensor[N, Ho, Wo] bool on the output grid.

    Returns:
        Tensor[P, C_out], the output rows of the active positions in ``mask.nonzero()`` order.
    """
    s, p, d = square_param(stride), square_param(padding), square_param(dilation)
    n, _, h, w = x.shape
    k = weight.shape[-1]
    ho, wo = conv_out_size(h, k, s, p, d), conv_out_size(w, k, s, p, d)
    if tuple(mask.shape) != (n, ho, wo):
        raise ValueError(f"mask must be Tensor[{n}, {ho}, {wo}] for this convolution, got {tuple(mask.shape)}")
    wmat = cached_weight_matrix(weight)
    compiled = pixel_chain(x, [mask], [wmat], [None], [(k, s, p, d)], [False])
    if compiled is not None:
        return compiled[0]
    positions = active_positions(mask)
    if positions.shape[0] == 0:
        return x.new_zeros((0, weight.shape[0]))
    return gather_conv_image(x, wmat, positions, kernel=k, stride=s, padding=p, dilation=d)


def gather_conv_image(
    x: Tensor,
    wmat: Tensor,
    positions: Tensor,
    *,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    bias: Tensor | None = None,
) -> Tensor:
    """:func:`gather_conv_rows` reading a whole image: the convolution of ``x`` at ``positions``.

    With the compiled gather the image is read in place when it is channels-last (an NCHW image is transposed
    once); otherwise it is laid out as rows plus a zero row (:func:`channels_last_rows`) for the reference path.

    Args:
        x: Tensor[N, C, H, W]; wmat: Tensor[k·k·C, C_out] (:func:`weight_matrix`); positions: Tensor[P, 3] long.
        kernel, stride, padding, dilation: the convolution's geometry; bias: Tensor[C_out] or ``None``.

    Returns:
        Tensor[P, C_out].
    """
    n, c, h, w = x.shape
    p = positions.shape[0]
    ext = compiled_kernels(x, positions) if p else None
    if ext is not None and wmat.shape[0] == kernel * kernel * c:
        image = x.permute(0, 2, 3, 1).contiguous()
        geometry = (kernel, stride, padding, dilation)
        chunk = _gather_chunk(wmat.shape[0])
        out = _parallel_gather_gemm(image, None, positions, wmat, bias, chunk, geometry)
        if out is not None:
            return out
        return _chunked_gemm(
            p,
            chunk,
            lambda i, j: ext.gather_im2col_image(image, positions, i, j, *geometry),
            wmat,
            bias,
        )
    rows, zero_row = channels_last_rows(x)
    return gather_conv_rows(
        rows,
        input_lookup(n, h, w, x.device),
        wmat,
        positions,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=bias,
        zero_row=zero_row,
    )


def masked_conv2d_reference(
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> Tensor:
    """The reference of :func:`gather_conv2d`: dense convolution, then the active rows (Tensor[P, C_out])."""
    y = F.conv2d(x, weight, None, stride, padding, dilation)
    return y.permute(0, 2, 3, 1)[mask]


def scatter_add_rows(base: Tensor, values: Tensor, positions: Tensor) -> Tensor:
    """``base`` (Tensor[N, C, H, W]) plus ``values`` (Tensor[P, C]) at ``positions`` (Tensor[P, 3]).

    Returns a new tensor in ``base``'s memory format (``base`` is not modified): a plain copy of ``base`` and
    one ``index_put_`` of the rows (2–3× faster on CPU than a transposing copy to channels-last rows).
    """
    out = base.clone()
    if values.shape[0]:
        n, c, h, w = out.shape
        if out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous():
            # Channels-last: the pixels are rows of one matrix, and a row-wise index_add_ is a plain add of
            # contiguous rows (about 40 % faster than the three-index index_put_ at batch 16, C=128).
            flat = (positions[:, 0] * h + positions[:, 1]) * w + positions[:, 2]
            out.permute(0, 2, 3, 1).view(n * h * w, c).index_add_(0, flat, values.to(out.dtype))
        else:
            # Positions are unique, so accumulating adds each row once.
            out.permute(0, 2, 3, 1).index_put_(
                (positions[:, 0], positions[:, 1], positions[:, 2]), values.to(out.dtype), accumulate=True
            )
    return out


@dataclass(frozen=True)
class SparseConvResult:
    """Output of :func:`sparse_conv2d`.

    Attributes:
        rows: Tensor[P, C_out] the active output rows.
        executed: Tensor[N] float64 MACs really performed per sample (all positions when it ran dense).
        dense: whether the dense fallback ran.
    """

    rows: Tensor
    executed: Tensor
    dense: bool


def sparse_conv2d(
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    crossover: float | None = None,
) -> SparseConvResult:
    """The convolution at the active positions, with the dense fallback above the crossover density.

    Args:
        x: Tensor[N, C, H, W]; weight: Tensor[C_out, C, k, k]; mask: Tensor[N, Ho, Wo] bool.
        crossover: density above which the dense convolution runs; ``None``: the calibrated value of this
            layer shape in :data:`CROSSOVERS`, else :data:`DEFAULT_CROSSOVER`.
    """
    n, c, h, w = x.shape
    c_out, _, k, _ = weight.shape
    if crossover is None:
        crossover = CROSSOVERS.get((c, c_out, k, stride, h, w, n), DEFAULT_CROSSOVER)
    per_position = float(weight.numel())
    density = float(mask.float().mean()) if mask.numel() else 0.0
    if density > crossover:
        rows = masked_conv2d_reference(x, weight, mask, stride=stride, padding=padding, dilation=dilation)
        executed = torch.full((n,), per_position * mask[0].numel(), dtype=torch.float64, device=x.device)
        return SparseConvResult(rows, executed, True)
    rows = gather_conv2d(x, weight, mask, stride=stride, padding=padding, dilation=dilation)
    executed = mask.flatten(1).sum(1).double() * per_position
    return SparseConvResult(rows, executed, False)


def calibrate_crossover(
    c_in: int,
    c_out: int,
    kernel: int,
    size: tuple[int, int],
    *,
    batch: int = 1,
    stride: int = 1,
    densities: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    repeats: int = 20,
    seed: int = 0,
) -> float:
    """Measure the density above which the dense convolution beats the gather path for one layer shape.

    Stores the result in :data:`CROSSOVERS` and returns it (1.0 when the gather path wins everywhere).
    Wall-clock timing: call it once per deployment shape, never in a test.
    """
    g = torch.Generator().manual_seed(seed)
    h, w = size
    padding = kernel // 2
    x = torch.randn(batch, c_in, h, w, generator=g)
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=g)
    ho, wo = conv_out_size(h, kernel, stride, padding, 1), conv_out_size(w, kernel, stride, padding, 1)

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    with torch.no_grad():
        dense_t = best(lambda: F.conv2d(x, weight, None, stride, padding))
        crossover = 1.0
        for d in densities:
            mask = torch.rand(batch, ho, wo, generator=g) < d
            t = best(lambda m=mask: gather_conv2d(x, weight, m, stride=stride, padding=padding))
            if t >= dense_t:
                crossover = d
                break
    CROSSOVERS[(c_in, c_out, kernel, stride, h, w, batch)] = crossover
    return crossover
