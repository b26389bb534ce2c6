"""Spatially dynamic residual blocks: which block classes split into which conv stages (the chain registry), and
:class:`SpatialResidual`, the dynamic block of the spatial and block families, run by the pure chain functions of
:mod:`dynnet.kernels.chain`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dynnet.blocks.residual import AdaptedResidual
from dynnet.convert.residual import ResidualAdapter, plain_timm_branch
from dynnet.core import Decision, current_trace
from dynnet.core.registry import TypeRegistry
from dynnet.kernels import autotune
from dynnet.kernels.block import scatter_tiles, tiles_to_pixels
from dynnet.kernels.chain import (
    ConvStage,
    chain_sizes,
    is_depthwise,
    run_masked,
    run_pixels,
    run_tiles,
    stage_masks,
    tile_macs,
)
from dynnet.kernels.spatial import scatter_add_rows

__all__ = [
    "SpatialResidual", "calibrate_dense_fallback_", "no_spatial_chain", "register_spatial_chain", "spatial_chain",
]  # fmt: skip


def register_spatial_chain(cls: type, fn: Callable[[nn.Module], list[ConvStage] | None]) -> None:
    """Teach the spatial engine how to split the residual branch of ``cls`` (and of its subclasses that keep its
    ``forward``) into conv stages; ``fn`` returns ``None`` for an instance whose branch is not a plain chain."""
    _CHAINS.register(cls, fn)


def spatial_chain(
    block: nn.Module, *, grouped: bool = False, depthwise: bool = True, squeeze: bool = False
) -> list[ConvStage] | None:
    """The conv stages of ``block``'s residual branch, or ``None`` for an unknown block class.

    Args:
        block: a residual block.
        grouped: whether the caller runs grouped convolutions (tile execution: SBNet); the pixel kernels run dense
            (groups=1) and depthwise convolutions only.
        depthwise: whether the caller runs depthwise convolutions (the pixel kernels do; a recipe with its own
            per-convolution kernels may run dense ones only).
        squeeze: whether the caller runs a stage's squeeze-excitation (``ConvStage.se``: the masked and pixel
            executions do; tiles, halting and per-convolution kernels do not).
    """
    fn = _CHAINS.lookup(block)
    stages = None if fn is None else fn(block)
    if stages is None:  # unknown class, or an instance whose branch is not a plain chain
        return None
    if not grouped and any(st.conv.groups != 1 and not (depthwise and is_depthwise(st.conv)) for st in stages):
        return None
    if not squeeze and any(st.se is not None for st in stages):
        return None
    return stages


def no_spatial_chain(
    model: nn.Module, blocks: list[nn.Module], recipe: str, *, grouped: bool = False, depthwise: bool = True
) -> ValueError:
    """The one-line error of a spatial recipe that finds no residual block whose branch it can run under a mask.

    Args:
        model: the network.
        blocks: its residual blocks (those with an adapter).
        recipe: who asks.
        grouped: whether the recipe runs grouped convolutions (:func:`spatial_chain`).
        depthwise: whether it runs depthwise ones (the pixel engine does; a recipe with its own per-convolution
            kernels may not).
    """
    kinds = sorted({type(b).__name__ for b in blocks})
    found = f"its residual blocks ({', '.join(kinds)}) have" if kinds else "it has no residual blocks and"
    if grouped:
        what = "conv-BN-activation stages (torchvision ResNet/ResNeXt/Wide ResNet, MobileNetV2, MobileNetV3 blocks "
        what += "without squeeze-excitation, timm ResNet without SE, dynnet CIFAR ResNets)"
        lacks = "squeeze-excitation, LayerNorm/MLP branches or stochastic depth"
    elif not depthwise:
        what = "dense (groups=1) conv-BN-activation stages (the BasicBlock/Bottleneck of torchvision ResNet/Wide "
        what += "ResNet, timm ResNet without SE, dynnet CIFAR ResNets)"
        lacks = "grouped or depthwise convolutions, squeeze-excitation, LayerNorm/MLP branches or stochastic depth"
    else:
        what = "dense (groups=1) or depthwise conv-BN-activation stages (the BasicBlock/Bottleneck of torchvision "
        what += "ResNet/Wide ResNet, MobileNetV2/V3's inverted residuals and EfficientNet's MBConv with their "
        what += "squeeze-excitation, timm ResNet without SE, dynnet CIFAR ResNets)"
        lacks = "grouped convolutions, LayerNorm/MLP branches, fused or timm inverted residuals"
    return ValueError(
        f"{recipe} needs residual branches that are plain chains of {what}; {type(model).__name__}: {found} {lacks}; "
        "register a chain with dynnet.blocks.register_spatial_chain"
    )


def _basic(b: nn.Module) -> list[ConvStage]:
    return [ConvStage(b.conv1, b.bn1, b.relu), ConvStage(b.conv2, b.bn2, None)]


def _bottleneck(b: nn.Module) -> list[ConvStage]:
    return [ConvStage(b.conv1, b.bn1, b.relu), ConvStage(b.conv2, b.bn2, b.relu), ConvStage(b.conv3, b.bn3, None)]


def _timm_basic(b: nn.Module) -> list[ConvStage] | None:
    if not plain_timm_branch(b):
        return None
    return [ConvStage(b.conv1, b.bn1, b.act1), ConvStage(b.conv2, b.bn2, None)]


def _timm_bottleneck(b: nn.Module) -> list[ConvStage] | None:
    if not plain_timm_branch(b):
        return None
    return [ConvStage(b.conv1, b.bn1, b.act1), ConvStage(b.conv2, b.bn2, b.act2), ConvStage(b.conv3, b.bn3, None)]


def _conv_norm_chain(layers: nn.Sequential) -> list[ConvStage] | None:
    """Stages of a ``Sequential`` of ``Conv2dNormActivation`` layers and ``(Conv2d, BatchNorm2d)`` pairs (torchvision's
    inverted residuals), a ``SqueezeExcitation`` after a stage becoming that stage's ``se``; ``None`` when it holds
    anything else (a global operation)."""
    from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

    stages: list[ConvStage] = []
    items = list(layers.children())
    i = 0
    while i < len(items):
        m = items[i]
        if isinstance(m, Conv2dNormActivation):
            parts = list(m.children())
            if not (1 <= len(parts) <= 3 and type(parts[0]) is nn.Conv2d):
                return None
            bn = parts[1] if len(parts) > 1 and type(parts[1]) is nn.BatchNorm2d else None
            act = parts[2] if len(parts) > 2 else None
            if len(parts) > 1 and bn is None:
                return None
            stages.append(ConvStage(parts[0], bn, act))
            i += 1
        elif type(m) is nn.Conv2d and i + 1 < len(items) and type(items[i + 1]) is nn.BatchNorm2d:
            stages.append(ConvStage(m, items[i + 1], None))
            i += 2
        elif type(m) is SqueezeExcitation and stages and stages[-1].se is None:
            stages[-1] = dataclasses.replace(stages[-1], se=m)
            i += 1
        else:
            return None
    return stages or None


def _inverted_v2(b: nn.Module) -> list[ConvStage] | None:
    return _conv_norm_chain(b.conv)


def _inverted_v3(b: nn.Module) -> list[ConvStage] | None:
    return _conv_norm_chain(b.block)  # EfficientNet's MBConv too (its stochastic depth: the identity at inference)


def _register_builtin() -> None:
    from torchvision.models.efficientnet import MBConv
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.mobilenetv3 import InvertedResidual as InvertedResidualV3
    from torchvision.models.resnet import BasicBlock as TvBasic
    from torchvision.models.resnet import Bottleneck as TvBottleneck

    from dynnet.models.cifar_resnet import BasicBlock as CifarBasic

    for cls, fn in (
        (CifarBasic, _basic),
        (TvBasic, _basic),
        (TvBottleneck, _bottleneck),
        (InvertedResidual, _inverted_v2),
        (InvertedResidualV3, _inverted_v3),
        (MBConv, _inverted_v3),
    ):
        register_spatial_chain(cls, fn)
    try:
        from timm.models.resnet import BasicBlock as TimmBasic
        from timm.models.resnet import Bottleneck as TimmBottleneck
    except ImportError:  # timm is optional
        return
    register_spatial_chain(TimmBasic, _timm_basic)
    register_spatial_chain(TimmBottleneck, _timm_bottleneck)


# Built-ins registered on first use (torchvision is imported only then).
_CHAINS: TypeRegistry[Callable[[nn.Module], list[ConvStage] | None]] = TypeRegistry(
    "spatial chain", same_forward=True, loader=_register_builtin
)


class SpatialResidual(AdaptedResidual):
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
        if execution not in ("pixel", "tile"):
            raise ValueError(f"execution must be 'pixel' or 'tile', got {execution!r}")
        super().__init__(block, adapter)
        object.__setattr__(self, "_stages", stages)
        self.execution = execution
        self.tile = int(tile)
        # Density of the output mask above which sparse mode runs the masked (dense) computation instead of the
        # gather kernels: 1.0 = never (the default); set per block from measurements by calibrate_dense_fallback_.
        self.dense_above = 1.0
        if gate is not None:
            self.gate = gate

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
        else:
            masks = stage_masks(self._stages, tiles_to_pixels(hard, self.tile, sizes[-1]), sizes[1:])
        if self._runs_dense(x, hard, masks):
            # Faster for this layer at this density (calibrated or measured): the dense convolutions, masked.
            branch = self._masked_branch(x, masks)
            body = self.cost("body", lambda m, inp: m.body(inp), x)
            executed = torch.full((x.shape[0],), float(body), dtype=torch.float64, device=x.device)
            self._record(x, d, masks, executed=executed, gate_ran=gate_ran)
            return self.post(base + branch)
        if self.execution == "pixel":
            if not bool(masks[0].any()):
                out, executed = base, torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            else:
                rows, positions, executed = run_pixels(self._stages, x, masks)
                out = scatter_add_rows(base if not self.interpolates else torch.zeros_like(base), rows, positions)
            if self.interpolates:
                out = base + self.interpolate(out if bool(masks[0].any()) else torch.zeros_like(base), masks[-1])
        else:
            tiles = hard.nonzero()
            values, executed = run_tiles(self._stages, x, tiles, self.tile)
            out = scatter_tiles(base, values, tiles, self.tile)
        self._record(x, d, masks, executed=executed, gate_ran=gate_ran)
        return self.post(out)

    def _runs_dense(self, x: Tensor, hard: Tensor, masks: list[Tensor]) -> bool:
        """Whether sparse mode runs the branch as masked dense convolutions for this input: above ``dense_above``
        when :func:`calibrate_dense_fallback_` set it (pixel execution); always where the tiles with their halos
        would cost at least the dense branch (tile execution: sparse mode never executes more MACs than dense);
        otherwise where measured dispatch
        (:mod:`dynnet.kernels.autotune`, once per input shape and density bucket) timed the masked dense branch
        faster than the gather kernels. Both give the same values; the MACs recorded say which ran.

        Args:
            x: Tensor[N, C, H, W] the block's input.
            hard: Tensor[N, h, w] bool, the decision (pixels or tiles).
            masks: the per-stage pixel masks of ``hard``.
        """
        density = float(masks[-1].float().mean())
        if self.execution == "pixel" and self.dense_above < 1.0:
            return density > self.dense_above
        if not bool(hard.any()):
            return False
        if self.execution == "tile":  # never more work than dense: tiles' halos overlap, and can cost more
            body = self.cost("body", lambda m, inp: m.body(inp), x)
            if int(hard.sum()) * tile_macs(self._stages, self.tile) >= x.shape[0] * body:
                return True
        if self.execution == "pixel":
            sparse = lambda: run_pixels(self._stages, x, masks)  # noqa: E731
        else:
            sparse = lambda: run_tiles(self._stages, x, hard.nonzero(), self.tile)  # noqa: E731
        layout = x.is_contiguous(memory_format=torch.channels_last)
        key = ("spatial", self.execution, id(self), tuple(x.shape), x.dtype, layout, autotune.density_bucket(density))
        return autotune.choose(key, {"sparse": sparse, "dense": lambda: self._masked_branch(x, masks)}) == "dense"

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
        chain = sum(st.per_position * h * w + st.se_macs for st, (h, w) in zip(self._stages, sizes[1:], strict=True))
        if chain != body:
            raise RuntimeError(
                f"{self.block_name}: the conv stages cost {chain} MACs but the residual branch costs {body}; "
                "register the right chain with dynnet.blocks.register_spatial_chain"
            )
        return float(body)

    def _record(self, x: Tensor, d: Decision, masks: list[Tensor], executed: Tensor | None, gate_ran: bool) -> None:
        t = current_trace()
        if t is None:
            return
        t.record_decision(self.block_name, d)
        body = self._check_chain(x)
        se = float(sum(st.se_macs for st in self._stages))  # squeeze-excitations: a fixed cost per sample
        stages = zip(self._stages, masks, strict=True)
        macs = se + sum(m.flatten(1).sum(1).double() * st.per_position for st, m in stages)
        t.record_macs(
            f"{self.block_name}/body",
            macs,
            executed=body if executed is None else executed,
            minimum=se,
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
