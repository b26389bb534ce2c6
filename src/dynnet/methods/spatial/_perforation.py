"""PerforatedCNNs as pure functions: perforation masks, nearest-neighbour interpolation, and the sparse execution
of one perforated conv stage (its plan, derived from the mask).

The recipe (:mod:`dynnet.methods.spatial.perforated_cnn`, which re-exports the public names) stores the masks,
caches the plans per mask version and records decisions and MACs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dynnet.kernels.chain import ConvStage, folded_conv, folded_stage
from dynnet.kernels.pixels import conv_out_size
from dynnet.kernels.spatial import gather_conv_image

__all__ = [
    "StagePlan",
    "grid_mask",
    "interpolation_maps",
    "kept_count",
    "nearest_interpolate",
    "pooling_structure_mask",
    "run_stage",
    "stage_plan",
    "uniform_mask",
]


# -- masks (pure functions) ----------------------------------------------------------------------------------------


def kept_count(size: tuple[int, int], keep: float) -> int:
    """Positions a mask of ``size`` keeps at evaluated fraction ``keep``: ``round(keep·H·W)``, at least one."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep}")
    return max(1, min(size[0] * size[1], round(keep * size[0] * size[1])))


def uniform_mask(size: tuple[int, int], keep: float, generator: torch.Generator | None = None) -> Tensor:
    """``round(keep·H·W)`` positions (at least one) drawn uniformly at random: Tensor[H, W] bool."""
    h, w = size
    chosen = torch.randperm(h * w, generator=generator)[: kept_count(size, keep)]
    return torch.zeros(h * w, dtype=torch.bool).index_fill_(0, chosen, True).view(h, w)


def _spread(n: int, total: int) -> Tensor:
    """``n`` evenly spaced indices in ``[0, total)`` (centred in their cells)."""
    return ((torch.arange(n, dtype=torch.float64) + 0.5) * total / n).floor().long()


def grid_mask(size: tuple[int, int], keep: float) -> Tensor:
    """A regular grid: ``a`` evenly spaced rows × ``b`` evenly spaced columns, ``a·b`` closest to ``keep·H·W``
    (then the most even split of the rate between rows and columns). Tensor[H, W] bool."""
    h, w = size
    target = kept_count(size, keep)
    best = None
    for a in range(1, h + 1):
        for b in {max(1, min(w, target // a)), max(1, min(w, -(-target // a)))}:
            key = (abs(a * b - target), abs(a / h - b / w))
            if best is None or key < best[0]:
                best = (key, a, b)
    _, a, b = best
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[_spread(a, h)[:, None], _spread(b, w)[None, :]] = True
    return mask


def _window_counts(n: int, kernel: int, stride: int, padding: int) -> Tensor:
    """How many windows of a (kernel, stride, padding) sliding operation cover each of ``n`` positions."""
    out = conv_out_size(n, kernel, stride, padding, 1)
    starts = torch.arange(out) * stride - padding
    pos = torch.arange(n)
    return ((pos[:, None] >= starts[None, :]) & (pos[:, None] < starts[None, :] + kernel)).sum(1)


def pooling_structure_mask(
    size: tuple[int, int],
    keep: float,
    *,
    kernel: int = 3,
    stride: int = 1,
    padding: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The ``round(keep·H·W)`` positions covered by the most windows of the operation reading this output.

    Args:
        size: ``(H, W)``.
        keep: fraction of positions evaluated.
        kernel, stride, padding: geometry of the reading operation (pooling, or the next convolution).
        generator: breaks ties between equally covered positions at random.

    Returns:
        Tensor[H, W] bool.
    """
    h, w = size
    counts = (_window_counts(h, kernel, stride, padding)[:, None] * _window_counts(w, kernel, stride, padding)).view(-1)
    perm = torch.randperm(h * w, generator=generator)
    order = perm[torch.sort(counts[perm], descending=True, stable=True).indices]
    return torch.zeros(h * w, dtype=torch.bool).index_fill_(0, order[: kept_count(size, keep)], True).view(h, w)


def interpolation_maps(mask: Tensor, *, static: bool = False) -> tuple[Tensor, Tensor]:
    """Nearest-neighbour interpolation of a perforation mask.

    Args:
        mask: Tensor[H, W] bool, at least one position set.
        static: compute without data-dependent shapes (no ``nonzero``: ``H·W × H·W`` distances instead of
            ``H·W × P``), so that ``torch.export`` and the TorchScript tracer can record it.

    Returns:
        ``(nearest, rank)``: Tensor[H·W] long, the flat index of the nearest evaluated position of every position
        (itself where evaluated; Euclidean distance, ties to the lowest index), and Tensor[H·W] long, the row of
        that position among the evaluated positions in ``mask.nonzero()`` order.
    """
    h, w = mask.shape
    flat = mask.reshape(-1)
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).view(-1, 2).to(mask.device)
    if static:
        d2 = ((grid[:, None, :] - grid[None, :, :]) ** 2).sum(-1).float()  # Tensor[H·W, H·W]
        nearest = d2.masked_fill(~flat[None, :], math.inf).argmin(1)
        return nearest, (flat.long().cumsum(0) - 1).index_select(0, nearest)
    kept = flat.nonzero().squeeze(1)
    if kept.numel() == 0:
        raise ValueError("a perforation mask must evaluate at least one position")
    d2 = ((grid[:, None, :] - grid[kept][None, :, :]) ** 2).sum(-1)  # Tensor[H·W, P]
    nearest_row = d2.argmin(1)
    return kept[nearest_row], nearest_row


def nearest_interpolate(v: Tensor, nearest: Tensor) -> Tensor:
    """Tensor[N, C, H, W] → the value of the nearest evaluated position everywhere (a gather: 0 MACs)."""
    return v.flatten(2).index_select(2, nearest).view_as(v)


# -- sparse execution of a perforated stage ------------------------------------------------------------------------


@dataclass(frozen=True)
class StagePlan:
    """How sparse mode runs one perforated stage (derived from its mask; cached per mask version).

    Attributes:
        kind: ``"dense"`` (nothing perforated), ``"grid"`` (the mask is a Cartesian product of rows and columns:
            the stage runs as one dense convolution over the gathered rows and columns, stride = kernel), or
            ``"gather"`` (any other mask: the pixel engine's gather-GEMM over the evaluated positions of the batch).
        evaluated: P, the number of evaluated positions.
        out_size: ``(H_out, W_out)``.
        positions: Tensor[P, 2] (row, column) of the evaluated positions (``"grid"`` and ``"gather"``).
        rows, cols: ``"grid"``: Tensor[k·|R|] / Tensor[k·|C|] indices into the padded input (the k taps of every
            evaluated row / column).
        near_rows, near_cols: ``"grid"``: Tensor[H_out] / Tensor[W_out], the rank of the nearest evaluated row /
            column (the nearest position of a Cartesian mask is separable).
    """

    kind: str
    evaluated: int
    out_size: tuple[int, int]
    positions: Tensor | None = None
    rows: Tensor | None = None
    cols: Tensor | None = None
    near_rows: Tensor | None = None
    near_cols: Tensor | None = None


def stage_plan(mask: Tensor, geometry: tuple[int, int, int, int], in_size: tuple[int, int]) -> StagePlan:
    """The :class:`StagePlan` of a stage with output mask Tensor[H_out, W_out] bool and conv ``geometry``."""
    k, s, _, d = geometry
    evaluated, out_size = int(mask.sum()), (int(mask.shape[0]), int(mask.shape[1]))
    if evaluated == mask.numel():
        return StagePlan("dense", evaluated, out_size)
    taps = torch.arange(k, device=mask.device) * d
    rows_on, cols_on = mask.any(1), mask.any(0)
    if bool(torch.equal(mask, rows_on[:, None] & cols_on[None, :])):
        r, c = rows_on.nonzero().squeeze(1), cols_on.nonzero().squeeze(1)
        # padded-input index of tap i of output row r: r·s + i·d (the padding shifts by p, which the pad undoes)
        in_rows = (r[:, None] * s + taps[None, :]).reshape(-1)
        in_cols = (c[:, None] * s + taps[None, :]).reshape(-1)
        near_rows = _nearest_rank(rows_on)
        near_cols = _nearest_rank(cols_on)
        return StagePlan("grid", evaluated, out_size, mask.nonzero(), in_rows, in_cols, near_rows, near_cols)
    return StagePlan("gather", evaluated, out_size, positions=mask.nonzero())


def _nearest_rank(on: Tensor) -> Tensor:
    """Tensor[L] bool → Tensor[L] long: the rank (among the set entries) of the nearest set entry, ties low."""
    idx = on.nonzero().squeeze(1)
    d = (torch.arange(on.numel(), device=on.device)[:, None] - idx[None, :]).abs()
    return d.argmin(1)


def run_stage(st: ConvStage, h: Tensor, plan: StagePlan, rank: Tensor) -> Tensor:
    """One perforated stage in sparse mode: Tensor[N, C, H, W] → interpolated Tensor[N, C_out, H_out, W_out]."""
    if plan.kind == "dense":
        h = st.conv(h)
        if st.bn is not None:
            h = st.bn(h)
        return st.act(h) if st.act is not None else h
    k, s, p, d = st.geometry
    n = h.shape[0]
    # Gathers run on the NHWC view (whole rows / C-vectors per index): along an inner NCHW dim, index_select
    # copies element by element and costs more than the convolution it saves.
    hl = h.permute(0, 2, 3, 1)
    # Measured (ResNet-20 ×0.5 on 64×64, 1 thread): the strided convolution over gathered rows and columns wins at
    # batch 1 (2.8 vs 4.5 ms per image), the pixel engine at batch 64 (140 vs 227 ms: column gathers of a few
    # channels cost more than they save).
    if plan.kind == "grid" and n == 1:
        assert plan.cols is not None and plan.near_rows is not None and plan.near_cols is not None
        w, b = folded_conv(st)  # batch norm folded in, cached on the parameters' versions
        hp = F.pad(hl, (0, 0, p, p, p, p)) if p else hl
        g = hp.index_select(1, plan.rows).index_select(2, plan.cols)  # Tensor[N, k·|R|, k·|C|, C]
        out = F.conv2d(g.permute(0, 3, 1, 2), w, b, stride=k, groups=st.conv.groups)  # the evaluated positions
        if st.act is not None:
            out = st.act(out)
        ol = out.permute(0, 2, 3, 1)
        return ol.index_select(1, plan.near_rows).index_select(2, plan.near_cols).permute(0, 3, 1, 2)
    if st.conv.groups != 1:
        raise ValueError("perforated sparse execution of grouped convolutions needs a grid mask and batch 1")
    kept = plan.positions
    assert kept is not None
    wmat, bias = folded_stage(st)
    positions = torch.cat([torch.arange(n, device=h.device).repeat_interleave(plan.evaluated)[:, None],
                           kept.repeat(n, 1)], 1)  # fmt: skip
    out = gather_conv_image(
        h, wmat, positions, kernel=k, stride=s, padding=p, dilation=d, bias=bias
    )  # one GEMM for the batch: Tensor[N·P, C_out]
    if st.act is not None:
        out = st.act(out)
    out = out.view(n, plan.evaluated, -1).index_select(1, rank)  # interpolation: a row gather
    return out.view(n, *plan.out_size, -1).permute(0, 3, 1, 2)
