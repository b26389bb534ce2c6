"""Block-sparse (tile) execution, after SBNet (Ren et al., CVPR 2018, arXiv:1801.02108).

A mask is reduced to active tiles; each active tile is gathered from the input *with its halo* (the
receptive field of the whole convolution chain that follows), the tiles form a batch, the chain runs
densely on that batch with ``padding=0``, and the output tiles are scattered back. The result at the
active tiles equals the dense chain's output exactly (positions of the halo that fall outside the
image are zeroed between convolutions, as zero padding would).

Executed MACs are those of the convolutions on the tile batch: ``T · r_i² · |weight_i|`` for stage ``i``
with region side ``r_i`` (halos included), which the aten-level counter sees as regular convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dynnet.kernels.pixels import channels_last_rows
from dynnet.kernels.spatial import compiled_kernels

__all__ = [
    "TileGeometry",
    "gather_tiles",
    "reduce_to_tiles",
    "region_rows",
    "scatter_tiles",
    "tile_geometry",
    "tiles_to_pixels",
]


def reduce_to_tiles(mask: Tensor, tile: int, *, threshold: float = 0.0) -> Tensor:
    """Tensor[N, H, W] pixel mask → Tensor[N, ceil(H/tile), ceil(W/tile)] bool tile mask.

    A tile is active when the fraction of its (in-image) active pixels exceeds ``threshold``
    (0: any active pixel, SBNet's "reduce mask" with max pooling).
    """
    m = mask.float().unsqueeze(1)
    h, w = m.shape[2:]
    nty, ntx = -(-h // tile), -(-w // tile)
    m = F.pad(m, (0, ntx * tile - w, 0, nty * tile - h))
    if threshold <= 0:
        return F.max_pool2d(m, tile).squeeze(1) > 0
    frac = F.avg_pool2d(m, tile).squeeze(1)
    return frac > threshold


def tiles_to_pixels(tile_mask: Tensor, tile: int, size: tuple[int, int]) -> Tensor:
    """Tensor[N, nty, ntx] (bool or float) → Tensor[N, H, W] by nearest upsampling and cropping."""
    up = tile_mask.repeat_interleave(tile, 1).repeat_interleave(tile, 2)
    return up[:, : size[0], : size[1]]


@dataclass(frozen=True)
class TileGeometry:
    """How a chain of convolutions maps an output tile to the input region it needs.

    Attributes:
        tile: output tile side (on the last stage's grid).
        regions: side ``r_i`` of the region each stage's *output* covers for one tile, from the chain's input
            (index 0) to its output (last, equal to ``tile``).
        offsets: offset ``o_i`` of that region relative to the tile origin ``t · steps[i]``.
        steps: distance between tile origins on each grid.
    """

    tile: int
    regions: tuple[int, ...]
    offsets: tuple[int, ...]
    steps: tuple[int, ...]


def tile_geometry(tile: int, convs: list[tuple[int, int, int, int]]) -> TileGeometry:
    """Regions, offsets and steps for a chain of convolutions given as ``(kernel, stride, padding, dilation)``."""
    regions, offsets, steps = [tile], [0], [tile]
    for k, s, p, d in reversed(convs):
        regions.append((regions[-1] - 1) * s + (k - 1) * d + 1)
        offsets.append(offsets[-1] * s - p)
        steps.append(steps[-1] * s)
    return TileGeometry(tile, tuple(reversed(regions)), tuple(reversed(offsets)), tuple(reversed(steps)))


def region_rows(tiles: Tensor, region: int, offset: int, step: int, size: tuple[int, int], outside: int = -1) -> Tensor:
    """Tensor[T, r, r] long: the channels-last row of every position of each tile's region.

    Position ``(n, y, x)`` of an ``[N, ·, H, W]`` grid is row ``(n·H + y)·W + x`` (as in
    :func:`dynnet.kernels.pixels.channels_last_rows`); positions outside the grid get ``outside``.
    """
    h, w = size
    ar = torch.arange(region, device=tiles.device)
    ys = tiles[:, 1:2] * step + offset + ar.view(1, -1)
    xs = tiles[:, 2:3] * step + offset + ar.view(1, -1)
    inside = ((ys >= 0) & (ys < h)).unsqueeze(2) & ((xs >= 0) & (xs < w)).unsqueeze(1)
    index = (tiles[:, 0].view(-1, 1, 1) * h + ys.unsqueeze(2)) * w + xs.unsqueeze(1)
    return torch.where(inside, index, outside)


def gather_tiles(x: Tensor, tiles: Tensor, region: int, offset: int, step: int) -> Tensor:
    """Cut the input regions of the active tiles out of ``x`` (zeros outside the image).

    One ``index_select`` of pixel rows (``x`` as channels-last rows plus a zero row for the halo outside the
    image): a row copy per pixel, and a tile batch in channels-last memory format, oneDNN's fastest layout.

    Args:
        x: Tensor[N, C, H, W].
        tiles: Tensor[T, 3] long ``(n, ty, tx)`` of active tiles.
        region, offset, step: side, offset and origin step of the regions on ``x``'s grid.

    Returns:
        Tensor[T, C, region, region] (channels-last memory format).
    """
    c, h, w = x.shape[1:]
    t = tiles.shape[0]
    if t == 0:
        return x.new_zeros((0, c, region, region))
    ext = compiled_kernels(x, tiles)
    if ext is not None:  # compiled: a row copy per region row, zeros outside the image
        return ext.gather_tile_regions(x.permute(0, 2, 3, 1).contiguous(), tiles, region, offset, step).permute(
            0, 3, 1, 2
        )
    rows, zero_row = channels_last_rows(x)
    index = region_rows(tiles, region, offset, step, (h, w), outside=zero_row)
    return rows.index_select(0, index.view(-1)).view(t, region, region, c).permute(0, 3, 1, 2)


def inside_image(tiles: Tensor, region: int, offset: int, step: int, size: tuple[int, int]) -> Tensor:
    """Tensor[T, 1, r, r] float: 1 where a tile region's position lies inside the ``size`` grid."""
    ar = torch.arange(region, device=tiles.device)
    rows = tiles[:, 1:2] * step + offset + ar.view(1, -1)
    cols = tiles[:, 2:3] * step + offset + ar.view(1, -1)
    ok_r = (rows >= 0) & (rows < size[0])
    ok_c = (cols >= 0) & (cols < size[1])
    return (ok_r.unsqueeze(2) & ok_c.unsqueeze(1)).unsqueeze(1).float()


def scatter_tiles(base: Tensor, values: Tensor, tiles: Tensor, tile: int) -> Tensor:
    """``base`` (Tensor[N, C, H, W]) plus the output tiles ``values`` (Tensor[T, C, tile, tile]) at ``tiles``.

    Returns a new tensor in ``base``'s memory format (``base`` is not modified); tile positions outside the
    image are dropped.
    """
    c, h, w = base.shape[1:]
    if tiles.shape[0] == 0:
        return base
    ext = compiled_kernels(values, tiles) if base.dtype == torch.float32 and not base.requires_grad else None
    if ext is not None:  # compiled: the clone, then each tile's in-image pixels added
        return ext.scatter_tiles_add(base, values, tiles, tile)
    t = tiles.shape[0]
    ar = torch.arange(tile, device=tiles.device)
    ys = (tiles[:, 1:2] * tile + ar.view(1, -1)).view(t, tile, 1).expand(t, tile, tile).reshape(-1)
    xs = (tiles[:, 2:3] * tile + ar.view(1, -1)).view(t, 1, tile).expand(t, tile, tile).reshape(-1)
    ns = tiles[:, 0].repeat_interleave(tile * tile)
    rows = values.permute(0, 2, 3, 1).reshape(-1, c).to(base.dtype)
    if (tiles[:, 1].max() + 1) * tile > h or (tiles[:, 2].max() + 1) * tile > w:
        keep = ((ys < h) & (xs < w)).nonzero().squeeze(1)
        ns, ys, xs, rows = ns[keep], ys[keep], xs[keep], rows.index_select(0, keep)
    out = base.clone()
    # Tiles do not overlap: accumulating adds each pixel once.
    out.permute(0, 2, 3, 1).index_put_((ns, ys, xs), rows, accumulate=True)
    return out
