"""The spatial execution engine of a residual block: a chain of conv–BN–activation stages run under a mask.

A residual branch such as ResNet's BasicBlock is a chain ``conv1 → BN → ReLU → conv2 → BN``. Given the
mask of the output positions to compute, every earlier stage must be computed on the positions that
the later ones read (the receptive masks: DynConv's "dilated mask"). Three executions:

* :func:`run_masked` — the reference: dense stages, each output multiplied by its mask (differentiable);
* :func:`run_pixels` — gather–GEMM–scatter at the active positions of each stage
  (:mod:`dynnet.kernels.spatial`);
* :func:`run_tiles` — SBNet's tile batches with halos (:mod:`dynnet.kernels.block`).

:class:`SpatialResidual` is the dynamic block built on them, shared by the spatial and block families.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert.residual import ResidualAdapter
from dynnet.core import Decision, DynamicBlock, current_trace
from dynnet.kernels.block import gather_tiles, inside_image, scatter_tiles, tile_geometry, tiles_to_pixels
from dynnet.kernels.channel import fold_bn
from dynnet.kernels.spatial import (
    compiled_kernels,
    conv_out_size,
    gather_conv_image,
    gather_conv_rows,
    pixel_chain,
    receptive_mask,
    rows_lookup,
    scatter_add_rows,
    weight_matrix,
)

__all__ = [
    "ConvStage",
    "SpatialResidual",
    "calibrate_dense_fallback_",
    "chain_sizes",
    "folded_stage",
    "register_spatial_chain",
    "run_masked",
    "run_pixels",
    "run_tiles",
    "spatial_chain",
    "stage_masks",
]


@dataclass(frozen=True)
class ConvStage:
    """One stage of a residual branch: ``act(bn(conv(x)))``; ``bn`` and ``act`` may be ``None``."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None
    act: Callable[[Tensor], Tensor] | None

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


_CHAINS: dict[type, Callable[[nn.Module], list[ConvStage]]] = {}


def register_spatial_chain(cls: type, fn: Callable[[nn.Module], list[ConvStage]]) -> None:
    """Teach the spatial engine how to split the residual branch of ``cls`` into conv stages."""
    if cls in _CHAINS:
        raise ValueError(f"a spatial chain for {cls.__qualname__} is already registered")
    _CHAINS[cls] = fn


def spatial_chain(block: nn.Module) -> list[ConvStage] | None:
    """The conv stages of ``block``'s residual branch, or ``None`` for an unknown block class."""
    fn = _CHAINS.get(type(block))
    if fn is None:
        return None
    stages = fn(block)
    for st in stages:
        if st.conv.groups != 1:
            return None
    return stages


def _basic(b: nn.Module) -> list[ConvStage]:
    return [ConvStage(b.conv1, b.bn1, b.relu), ConvStage(b.conv2, b.bn2, None)]


def _bottleneck(b: nn.Module) -> list[ConvStage]:
    return [ConvStage(b.conv1, b.bn1, b.relu), ConvStage(b.conv2, b.bn2, b.relu), ConvStage(b.conv3, b.bn3, None)]


def _register_builtin() -> None:
    from torchvision.models.resnet import BasicBlock as TvBasic
    from torchvision.models.resnet import Bottleneck as TvBottleneck

    from dynnet.models.cifar_resnet import BasicBlock as CifarBasic

    register_spatial_chain(CifarBasic, _basic)
    register_spatial_chain(TvBasic, _basic)
    register_spatial_chain(TvBottleneck, _bottleneck)


_register_builtin()


# -- pure functions ---------------------------------------------------------------------------------------------


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
        if i == 0:  # the input image (read in place when channels-last and the compiled gather is built)
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
        executed += m.flatten(1).sum(1).double() * st.per_position
    return rows, positions, executed


def _compiled_pixels(stages: list[ConvStage], x: Tensor, masks: list[Tensor]) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`run_pixels` as one compiled call (:func:`dynnet.kernels.spatial.pixel_chain`) when every activation is
    a ReLU or none and the call applies; else ``None``."""
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


def _border_tiles(tiles: Tensor, region: int, offset: int, step: int, size: tuple[int, int]) -> Tensor | None:
    """Tensor[B] long: the tiles whose region sticks out of the ``size`` grid (``None`` when there are none)."""
    lo_r, lo_c = tiles[:, 1] * step + offset, tiles[:, 2] * step + offset
    out = (lo_r < 0) | (lo_c < 0) | (lo_r + region > size[0]) | (lo_c + region > size[1])
    index = out.nonzero().squeeze(1)
    return index if index.numel() else None


def _is_relu(act: Callable[[Tensor], Tensor] | None) -> bool:
    return isinstance(act, nn.ReLU) or act is F.relu or act is torch.relu


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
    per_tile = 0
    for i, st in enumerate(stages, start=1):
        _, s, _, d = st.geometry
        weight, bias = folded_conv(st)  # batch norm folded in: one pass less over the tile batch
        h = F.conv2d(h, weight, bias, s, 0, d)
        per_tile += geo.regions[i] ** 2 * st.per_position
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
    return h, counts * per_tile


# -- the dynamic block ------------------------------------------------------------------------------------------


class SpatialResidual(DynamicBlock):
    """A residual block whose branch is computed only at the positions of a spatial mask.

    ``out = post(shortcut(x) + M ⊙ branch(x))`` with ``M`` the output mask. In ``"pixel"`` execution the
    intermediate stages are also masked by their receptive masks (DynConv), so the masked mode is exactly
    what the gather kernels compute; in ``"tile"`` execution (SBNet) the intermediate stages are dense and
    only the output is masked, which the haloed tiles reproduce exactly.

    Args:
        block: the original residual block (its children keep their names).
        adapter: body / shortcut / post of the block.
        stages: the branch's conv stages (:func:`spatial_chain`).
        gate: the mask unit (``None`` when masks come from outside, e.g. SACT's halting).
        execution: ``"pixel"`` or ``"tile"``.
        tile: tile side for ``"tile"`` execution (and the granularity of block decisions).

    Subclasses implement :meth:`decide`; a decision's ``hard`` is Tensor[N, H_L, W_L] (pixel) or
    Tensor[N, ceil(H_L/tile), ceil(W_L/tile)] (tile).
    """

    granularity = "spatial"

    def __init__(
        self,
        block: nn.Module,
        adapter: ResidualAdapter,
        stages: list[ConvStage],
        gate: nn.Module | None,
        *,
        execution: str = "pixel",
        tile: int = 4,
    ) -> None:
        super().__init__()
        if execution not in ("pixel", "tile"):
            raise ValueError(f"execution must be 'pixel' or 'tile', got {execution!r}")
        for child_name, child in block.named_children():
            self.add_module(child_name, child)
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_stages", stages)
        self.adapter = adapter
        self.execution = execution
        self.tile = int(tile)
        # Density of the output mask above which sparse mode runs the masked (dense) computation instead of the
        # gather kernels: 1.0 = never (the default); set per block from measurements by calibrate_dense_fallback_.
        self.dense_above = 1.0
        if gate is not None:
            self.gate = gate

    # -- pieces -----------------------------------------------------------------------------------------------
    def body(self, x: Tensor) -> Tensor:
        return self.adapter.body(self._block, x)

    def shortcut(self, x: Tensor) -> Tensor:
        return self.adapter.shortcut(self._block, x)

    def post(self, y: Tensor) -> Tensor:
        return self.adapter.post(self._block, y)

    def decide(self, x: Tensor) -> Decision:
        """The decision for Tensor[N, C, H, W] (straight-through ``hard`` in training)."""
        raise NotImplementedError

    def out_size(self, x: Tensor) -> tuple[int, int]:
        """Spatial size of the branch output for input ``x``."""
        return chain_sizes(self._stages, tuple(x.shape[2:]))[-1]

    def interpolate(self, branch: Tensor, mask: Tensor) -> Tensor:
        """Fill the skipped positions of the masked branch output (Tensor[N, C, H, W], zeros where ``mask``
        Tensor[N, H, W] is 0). The default keeps zeros (the skipped positions keep the shortcut); recipes that
        interpolate (stochastic sampling) override it and set ``interpolates = True``."""
        return branch

    interpolates: bool = False

    def pixel_mask(self, d: Decision, x: Tensor) -> Tensor:
        """The decision as a Tensor[N, H_L, W_L] output mask (tiles upsampled in tile execution)."""
        if self.execution == "tile":
            return tiles_to_pixels(d.hard, self.tile, self.out_size(x))
        return d.hard

    # -- modes ------------------------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor, decision: Decision | None = None) -> Tensor:
        return self.post(self.shortcut(x) + self.body(x))

    def forward_masked(self, x: Tensor, decision: Decision | None = None) -> Tensor:
        d = self._decision(x, decision)
        gate_ran = decision is None
        sizes = chain_sizes(self._stages, tuple(x.shape[2:]))
        masks = stage_masks(self._stages, self.pixel_mask(d, x), sizes[1:])
        out = self.post(self.shortcut(x) + self._masked_branch(x, masks))
        self._record(x, d, masks, executed=None, gate_ran=gate_ran)
        return out

    def forward_sparse(self, x: Tensor, decision: Decision | None = None) -> Tensor:
        d = self._decision(x, decision)
        gate_ran = decision is None
        sizes = chain_sizes(self._stages, tuple(x.shape[2:]))
        hard = d.hard.detach() > 0.5
        base = self.shortcut(x)
        if self.execution == "pixel":
            masks = stage_masks(self._stages, hard, sizes[1:])
            if self.dense_above < 1.0 and float(masks[-1].float().mean()) > self.dense_above:
                # Measured to be faster for this layer at this density: the dense convolutions, masked.
                branch = self._masked_branch(x, masks)
                body = self.cost("body", lambda m, inp: m.body(inp), x)
                executed = torch.full((x.shape[0],), float(body), dtype=torch.float64, device=x.device)
                self._record(x, d, masks, executed=executed, gate_ran=gate_ran)
                return self.post(base + branch)
            if not bool(masks[0].any()):
                out, executed = base, torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            else:
                rows, positions, executed = run_pixels(self._stages, x, masks)
                out = scatter_add_rows(base if not self.interpolates else torch.zeros_like(base), rows, positions)
            if self.interpolates:
                out = base + self.interpolate(out if bool(masks[0].any()) else torch.zeros_like(base), masks[-1])
        else:
            masks = stage_masks(self._stages, tiles_to_pixels(hard, self.tile, sizes[-1]), sizes[1:])
            tiles = hard.nonzero()
            values, executed = run_tiles(self._stages, x, tiles, self.tile)
            out = scatter_tiles(base, values, tiles, self.tile)
        self._record(x, d, masks, executed=executed, gate_ran=gate_ran)
        return self.post(out)

    def _masked_branch(self, x: Tensor, masks: list[Tensor]) -> Tensor:
        """The branch computed densely and masked (pixel execution: every stage; tile: the output only)."""
        used: list[Tensor | None] = (
            list(masks) if self.execution == "pixel" else [None] * (len(masks) - 1) + [masks[-1]]
        )
        branch = run_masked(self._stages, x, used)
        return self.interpolate(branch, masks[-1]) if self.interpolates else branch

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def _decision(self, x: Tensor, decision: Decision | None) -> Decision:
        return self.decide(x) if decision is None else decision

    def _check_chain(self, x: Tensor) -> float:
        """Dense MACs of the branch; checks that the conv stages account for all of them."""
        body = self.cost("body", lambda m, inp: m.body(inp), x)
        sizes = chain_sizes(self._stages, tuple(x.shape[2:]))
        chain = sum(st.per_position * h * w for st, (h, w) in zip(self._stages, sizes[1:], strict=True))
        if chain != body:
            raise RuntimeError(
                f"{self.block_name}: the conv stages cost {chain} MACs but the residual branch costs {body}; "
                "register the right chain with dynnet.kernels.register_spatial_chain"
            )
        return float(body)

    def _record(self, x: Tensor, d: Decision, masks: list[Tensor], executed: Tensor | None, gate_ran: bool) -> None:
        t = current_trace()
        if t is None:
            return
        t.record_decision(self.block_name, d)
        body = self._check_chain(x)
        macs = sum(m.flatten(1).sum(1).double() * st.per_position for st, m in zip(self._stages, masks, strict=True))
        t.record_macs(
            f"{self.block_name}/body",
            macs,
            executed=body if executed is None else executed,
            minimum=0.0,
            maximum=body,
            dense=body,
        )
        if gate_ran and hasattr(self, "gate"):  # a decision passed in from outside costs this block nothing
            g = self.cost("gate", lambda m, inp: m.gate(inp), x)
            t.record_macs(f"{self.block_name}/gate", float(g), batch_size=x.shape[0], minimum=g, maximum=g)


def calibrate_dense_fallback_(
    model: nn.Module, images: Tensor, *, min_run_time: float = 0.2, margin: float = 1.0
) -> dict[str, float]:
    """Measure, block by block, whether the gather kernels beat the masked dense path on ``images``; set each
    pixel-executed :class:`SpatialResidual`'s ``dense_above`` accordingly (in place).

    Each block is timed on the input it receives from ``images`` (captured by a forward hook), in sparse mode
    (gather kernels) and with the dense fallback forced, under ``torch.inference_mode``. Where the fallback is
    faster (by ``margin``), ``dense_above`` becomes the block's measured output density minus a little (the
    fallback then runs at this density and above); elsewhere it stays 1.0. Narrow layers (few channels, small
    maps) typically fall back: their gathers cost more than the convolution they skip. Wall-clock timing:
    call it once per deployment shape, never in a test that asserts a speed.

    Args:
        model: a converted model in eval mode.
        images: Tensor[N, C, H, W] representative inputs (the deployment batch size).
        min_run_time: seconds of timing per block and path.
        margin: the fallback is chosen when ``sparse_time > margin × dense_time``.

    Returns:
        ``{block_name: dense_above}`` for every calibrated block: pixel-executed blocks that take their own
        decisions and use this class's sparse path (DynConv, pixel-wise attentional gating, stochastic sampling).
    """
    from torch.utils.benchmark import Timer

    blocks = [  # blocks that decide for themselves and run SpatialResidual's own sparse path
        m
        for m in model.modules()
        if isinstance(m, SpatialResidual)
        and m.execution == "pixel"
        and hasattr(m, "gate")
        and type(m).forward_sparse is SpatialResidual.forward_sparse
    ]
    inputs: dict[int, Tensor] = {}
    hooks = [
        b.register_forward_pre_hook(lambda m, args, i=i: inputs.setdefault(i, args[0].detach()))
        for i, b in enumerate(blocks)
    ]
    modes = {i: b.mode for i, b in enumerate(blocks)}
    was_training = model.training
    model.eval()
    result: dict[str, float] = {}
    try:
        with torch.inference_mode():
            model(images)
        for h in hooks:
            h.remove()
        hooks = []
        for i, b in enumerate(blocks):
            if i not in inputs:
                continue
            x = inputs[i]
            b.mode = "sparse"
            saved = b.dense_above
            timings = {}
            for label, threshold in (("sparse", 1.0), ("dense", -1.0)):
                b.dense_above = threshold
                # Timer runs on one thread unless told otherwise: time with the threads inference will use.
                timer = Timer("b(x)", globals={"b": b, "x": x}, num_threads=torch.get_num_threads())
                with torch.inference_mode():
                    timings[label] = timer.blocked_autorange(min_run_time=min_run_time).median
            b.dense_above = saved
            choice = 1.0
            if timings["sparse"] > margin * timings["dense"]:
                with torch.inference_mode():
                    density = float((b.decide(x).hard > 0.5).float().mean())
                choice = max(0.0, density - 0.1)
            b.dense_above = choice
            result[b.block_name or f"block{i}"] = choice
    finally:
        for h in hooks:
            h.remove()
        for i, b in enumerate(blocks):
            b.mode = modes[i]
        model.train(was_training)
    return result
