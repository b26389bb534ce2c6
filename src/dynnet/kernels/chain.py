"""The spatial execution engine of a residual branch: a chain of conv–BN–activation stages run under a mask.

A residual branch such as ResNet's BasicBlock is a chain ``conv1 → BN → ReLU → conv2 → BN``. Given the
mask of the output positions to compute, every earlier stage must be computed on the positions that
the later ones read (the receptive masks: DynConv's "dilated mask"). Three executions:

* :func:`run_masked` — the reference: dense stages, each output multiplied by its mask (differentiable);
* :func:`run_pixels` — gather–GEMM–scatter at the active positions of each stage
  (:mod:`dynnet.kernels.spatial`; a depthwise stage — MobileNetV2's — gathers and weights channel by channel);
* :func:`run_tiles` — SBNet's tile batches with halos (:mod:`dynnet.kernels.block`).

Pure tensor functions over :class:`ConvStage`\\ s; which block classes split into which stages, and the dynamic
block built on these functions, live in :mod:`dynnet.blocks.spatial`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.kernels.block import TileGeometry, gather_tiles, inside_image, tile_geometry
from dynnet.kernels.channel import fold_bn
from dynnet.kernels.gemm import weight_matrix
from dynnet.kernels.pixels import (
    channels_last_rows,
    conv_out_size,
    gather_depthwise_rows,
    input_lookup,
    receptive_mask,
    rows_lookup,
)
from dynnet.kernels.spatial import compiled_kernels, gather_conv_image, gather_conv_rows, pixel_chain

__all__ = [
    "ConvStage", "chain_sizes", "folded_conv", "folded_stage", "is_depthwise", "run_masked", "run_pixels", "run_tiles",
    "stage_masks", "tile_macs",
]  # fmt: skip


@dataclass(frozen=True)
class ConvStage:
    """One stage of a residual branch: ``act(bn(conv(x)))``; ``bn`` and ``act`` may be ``None``. ``se``: a
    squeeze-excitation on the stage's (masked) output, ``h · s(mean h)`` (MobileNetV3's, EfficientNet's), run by
    :func:`run_masked` and :func:`run_pixels` only."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None
    act: Callable[[Tensor], Tensor] | None
    se: nn.Module | None = None

    @property
    def se_macs(self) -> int:
        """MACs per sample of the squeeze-excitation: its 1×1 convolutions or linear layers on the pooled vector."""
        if self.se is None:
            return 0
        return sum(m.weight.numel() for m in self.se.modules() if isinstance(m, nn.Conv2d | nn.Linear))

    @property
    def geometry(self) -> tuple[int, int, int, int]:
        """``(kernel, stride, padding, dilation)``, square."""
        c = self.conv
        k, s, p, d = c.kernel_size, c.stride, c.padding, c.dilation
        if isinstance(p, str) or len({k[0], k[1]}) > 1 or s[0] != s[1] or p[0] != p[1] or d[0] != d[1]:
            raise ValueError(f"spatial execution needs square, explicitly padded convolutions, got {c}")
        return k[0], s[0], p[0], d[0]

    @property
    def per_position(self) -> int:
        """MACs of one output position (``|weight|``)."""
        return self.conv.weight.numel()


def chain_sizes(stages: list[ConvStage], size: tuple[int, int]) -> list[tuple[int, int]]:
    """Spatial sizes ``[(H_0, W_0), (H_1, W_1), ...]``: the input, then each stage's output."""
    sizes = [size]
    for st in stages:
        k, s, p, d = st.geometry
        h, w = sizes[-1]
        sizes.append((conv_out_size(h, k, s, p, d), conv_out_size(w, k, s, p, d)))
    return sizes


def stage_masks(stages: list[ConvStage], out_mask: Tensor, sizes: list[tuple[int, int]]) -> list[Tensor]:
    """The output mask of every stage: the last is ``out_mask``, each earlier one the receptive mask of the next.

    Args:
        stages: the chain.
        out_mask: Tensor[N, H_L, W_L] (bool, or float straight-through values: gradients flow).
        sizes: the output size of every stage, ``chain_sizes(...)[1:]`` (``sizes[i]``: ``(H_{i+1}, W_{i+1})``).

    Returns:
        ``[m_1, ..., m_L]`` with ``m_i`` Tensor[N, H_i, W_i].
    """
    masks = [out_mask]
    for i in range(len(stages) - 1, 0, -1):
        k, s, p, d = stages[i].geometry
        # Stage i reads the output of stage i - 1 (they differ in size when a later stage strides, as in
        # torchvision's Bottleneck, whose 3×3 conv2 carries the stride).
        masks.append(receptive_mask(masks[-1], k, s, p, d, sizes[i - 1]))
    return masks[::-1]


_FOLDED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], Tensor, Tensor | None, Tensor]] = (
    weakref.WeakKeyDictionary()
)


def _folded(st: ConvStage) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(weight, bias, wmat)``: the folded Tensor[C_out, C, k, k], its bias, and its GEMM form."""
    tensors = [st.conv.weight, st.conv.bias]
    if st.bn is not None:
        tensors += [st.bn.weight, st.bn.bias, st.bn.running_mean, st.bn.running_var]
    key = tuple(-1 if t is None else t._version for t in tensors) + tuple(id(t) for t in tensors)
    hit = _FOLDED.get(st.conv)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2], hit[3]
    # Not an inference tensor even when first called under inference_mode: the cache outlives that context.
    with torch.inference_mode(False), torch.no_grad():
        w, b = (st.conv.weight, st.conv.bias) if st.bn is None else fold_bn(st.conv, st.bn)
        w = w.contiguous()
        wmat = weight_matrix(w)  # the transpose of a contiguous Tensor[C_out, k·k·C]: oneDNN's layout
        b = None if b is None else b.contiguous()
    _FOLDED[st.conv] = (key, w, b, wmat)
    return w, b, wmat


def folded_stage(st: ConvStage) -> tuple[Tensor, Tensor | None]:
    """The stage's convolution with inference batch norm folded in, as a GEMM: ``(Tensor[k·k·C, C_out], bias)``.

    ``w' = w · γ/σ``, ``b' = β + (b - μ) · γ/σ`` (0 MACs at inference: done once). Cached per convolution and
    recomputed whenever a parameter or running statistic changes (tensor version counters); computed without
    gradient (sparse mode is inference only).
    """
    _, b, wmat = _folded(st)
    return wmat, b


def folded_conv(st: ConvStage) -> tuple[Tensor, Tensor | None]:
    """:func:`folded_stage` as a convolution: ``(Tensor[C_out, C, k, k], bias)`` (same cache)."""
    w, b, _ = _folded(st)
    return w, b


def run_masked(stages: list[ConvStage], x: Tensor, masks: list[Tensor | None]) -> Tensor:
    """Reference: each stage dense, its output multiplied by its mask (``None``: not masked).

    Args:
        x: Tensor[N, C, H, W]; masks: per stage, Tensor[N, H_i, W_i] or ``None``.

    Returns:
        Tensor[N, C_L, H_L, W_L].
    """
    h = x
    for st, m in zip(stages, masks, strict=True):
        h = st.conv(h)
        if st.bn is not None:
            h = st.bn(h)
        if st.act is not None:
            h = st.act(h)
        if m is not None:
            h = h * m.unsqueeze(1).to(h.dtype)
        if st.se is not None:
            h = st.se(h)
    return h


def run_pixels(stages: list[ConvStage], x: Tensor, masks: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Gather–GEMM execution of the chain at the active positions of each stage (inference).

    Intermediate results stay compact (``Tensor[P_i, C_i]`` rows with a position → row lookup); batch norm is
    folded into each GEMM (:func:`folded_stage`).

    Args:
        x: Tensor[N, C, H, W]; masks: bool masks from :func:`stage_masks`.

    Returns:
        ``(rows, positions, executed)``: Tensor[P_L, C_L] outputs of the last stage at its active positions
        Tensor[P_L, 3], and Tensor[N] float64 MACs executed per sample.
    """
    compiled = _compiled_pixels(stages, x, masks)
    if compiled is not None:
        return compiled
    n = x.shape[0]
    executed = torch.zeros(n, dtype=torch.float64, device=x.device)
    rows, zero_row = x, 0
    positions = x.new_zeros((0, 3), dtype=torch.long)
    last = len(stages) - 1
    for i, (st, m) in enumerate(zip(stages, masks, strict=True)):
        k, s, p, d = st.geometry
        prev, positions = positions, m.nonzero()
        wmat, bias = folded_stage(st)
        geometry = {"kernel": k, "stride": s, "padding": p, "dilation": d, "bias": bias}
        if is_depthwise(st.conv):  # channel by channel: the k·k input rows of each position, weighted
            if i == 0:
                source, lookup = channels_last_rows(x)[0], input_lookup(n, *x.shape[2:], device=x.device)
            else:
                source, lookup = rows, rows_lookup(prev, (n, *masks[i - 1].shape[1:]), fill=zero_row)
            out = gather_depthwise_rows(source, lookup, folded_conv(st)[0], positions, **geometry)
        elif i == 0:  # the input image (read in place when channels-last and the compiled gather is built)
            out = gather_conv_image(x, wmat, positions, **geometry)
        else:
            lookup = rows_lookup(prev, (n, *masks[i - 1].shape[1:]), fill=zero_row)
            out = gather_conv_rows(rows, lookup, wmat, positions, zero_row=zero_row, **geometry)
        if i < last:
            # The next stage reads these rows through a lookup whose holes point at one extra zero row; the
            # activation writes straight into that buffer (no separate copy).
            zero_row = out.shape[0]
            if torch.is_grad_enabled() and out.requires_grad:
                rows = torch.cat([out if st.act is None else st.act(out), out.new_zeros((1, out.shape[1]))])
            else:
                rows = out.new_empty((zero_row + 1, out.shape[1]))
                rows[zero_row].zero_()
                if _is_relu(st.act):
                    torch.clamp_min(out, 0.0, out=rows[:zero_row])
                else:
                    rows[:zero_row] = out if st.act is None else st.act(out)
        else:
            rows = out if st.act is None else st.act(out)
        if st.se is not None:  # on the masked map (its pooling sees skipped positions as 0): scatter, excite, gather
            live = rows[:zero_row] if i < last else rows
            grid = live.new_zeros((n, *m.shape[1:], live.shape[1]))
            where = (positions[:, 0], positions[:, 1], positions[:, 2])
            grid[where] = live
            excited = st.se(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)[where]
            rows = torch.cat([excited, rows[zero_row:]]) if i < last else excited
            executed += float(st.se_macs)
        executed += m.flatten(1).sum(1).double() * st.per_position
    return rows, positions, executed


def _compiled_pixels(stages: list[ConvStage], x: Tensor, masks: list[Tensor]) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`run_pixels` as one compiled call (:func:`dynnet.kernels.spatial.pixel_chain`) when every activation is
    a ReLU or none and the call applies; else ``None``."""
    if any(st.se is not None or st.conv.groups != 1 for st in stages):
        return None
    if any(st.act is not None and not _is_relu(st.act) for st in stages):
        return None
    folded = [folded_stage(st) for st in stages]
    return pixel_chain(
        x,
        masks,
        [w for w, _ in folded],
        [b for _, b in folded],
        [st.geometry for st in stages],
        [st.act is not None for st in stages],
    )


def is_depthwise(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is depthwise (one filter per channel: ``groups = C_in = C_out``), which :func:`run_pixels`
    computes channel by channel; other grouped convolutions (ResNeXt's) it does not run."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _border_tiles(tiles: Tensor, region: int, offset: int, step: int, size: tuple[int, int]) -> Tensor | None:
    """Tensor[B] long: the tiles whose region sticks out of the ``size`` grid (``None`` when there are none)."""
    lo_r, lo_c = tiles[:, 1] * step + offset, tiles[:, 2] * step + offset
    out = (lo_r < 0) | (lo_c < 0) | (lo_r + region > size[0]) | (lo_c + region > size[1])
    index = out.nonzero().squeeze(1)
    return index if index.numel() else None


def _is_relu(act: Callable[[Tensor], Tensor] | None) -> bool:
    return isinstance(act, nn.ReLU) or act is F.relu or act is torch.relu


def tile_macs(stages: list[ConvStage], tile: int) -> int:
    """MACs :func:`run_tiles` spends on one output tile of side ``tile``, its halos included (the haloed region of
    every stage times that stage's MACs per position)."""
    return _haloed_macs(stages, tile_geometry(tile, [st.geometry for st in stages]))


def _haloed_macs(stages: list[ConvStage], geo: TileGeometry) -> int:
    """MACs per output tile: each stage's haloed region (``geo.regions``) times its MACs per position."""
    return sum(geo.regions[i] ** 2 * st.per_position for i, st in enumerate(stages, start=1))


def run_tiles(stages: list[ConvStage], x: Tensor, tiles: Tensor, tile: int) -> tuple[Tensor, Tensor]:
    """SBNet execution: the chain on a batch of haloed input tiles (inference).

    Args:
        x: Tensor[N, C, H, W].
        tiles: Tensor[T, 3] long ``(n, ty, tx)`` active output tiles (on the last stage's grid).
        tile: tile side.

    Returns:
        ``(values, executed)``: Tensor[T, C_L, tile, tile] output tiles and Tensor[N] float64 MACs per sample.
    """
    n = x.shape[0]
    sizes = chain_sizes(stages, tuple(x.shape[2:]))
    geo = tile_geometry(tile, [st.geometry for st in stages])
    h = gather_tiles(x, tiles, geo.regions[0], geo.offsets[0], geo.steps[0])
    for i, st in enumerate(stages, start=1):
        _, s, _, d = st.geometry
        weight, bias = folded_conv(st)  # batch norm folded in: one pass less over the tile batch
        h = F.conv2d(h, weight, bias, s, 0, d, st.conv.groups)  # grouped and depthwise stages too
        if _is_relu(st.act):
            h = h.relu_()
        elif st.act is not None:
            h = st.act(h)
        if i < len(stages):
            # Halo positions outside the image must read as the zero padding of the next convolution
            # (only tiles at the border have any: the others are left untouched).
            ext = compiled_kernels(h, tiles)
            if ext is not None:  # compiled, in place: only the outside positions of border tiles are written
                ext.zero_outside_tiles_(h, tiles, geo.offsets[i], geo.steps[i], *sizes[i])
            else:
                border = _border_tiles(tiles, geo.regions[i], geo.offsets[i], geo.steps[i], sizes[i])
                if border is not None:
                    inside = inside_image(tiles[border], geo.regions[i], geo.offsets[i], geo.steps[i], sizes[i])
                    h[border] = h[border] * inside.to(h.dtype)
    counts = torch.bincount(tiles[:, 0], minlength=n).double() if tiles.shape[0] else torch.zeros(n).double()
    return h, counts * _haloed_macs(stages, geo)
