"""PerforatedCNNs — Figurnov, Ibraimova, Vetrov & Kohli, "PerforatedCNNs: Acceleration through Elimination of
Redundant Convolutions", NeurIPS 2016. https://arxiv.org/abs/1504.08362

Every convolution of a residual branch is evaluated only at the positions of a fixed, input-independent
*perforation mask* of its output grid; the output at a perforated (skipped) position is the value of the nearest
evaluated position (the paper's nearest-neighbour interpolation), so the next layer reads a full feature map:

    V̂(p) = V(p)                         if M(p) = 1,
    V̂(p) = V(q*(p)),  q*(p) = argmin_{q: M(q)=1} ‖p - q‖   otherwise.

Masks are buffers (``gate.mask<i>`` of each block, one per conv stage), set at conversion and by the functions
below, never per batch; every input sees the same mask. The paper's knob is the perforation rate: here its
complement, the fraction of positions evaluated (``keep``), the same for every layer unless
:func:`set_perforation_` is given one per layer. Mask kinds (the paper's):

* ``"uniform"`` — positions drawn uniformly at random (:func:`uniform_mask`);
* ``"grid"``    — a regular grid: the Cartesian product of evenly spaced rows and columns (:func:`grid_mask`);
* ``"pooling"`` — positions covered by the most windows of the operation that reads the output
  (:func:`pooling_structure_mask`);
* ``"impact"``  — greedy removal of the positions of least estimated impact on the loss, the first-order Taylor
  estimate ``Σ_c |∂L/∂V · V|`` accumulated over a few batches, recomputed on the perforated network after each of a
  few removal rounds (:func:`impact_masks_`).

Execution (per conv stage; batch norm and the activation are per-position, so interpolating after them equals
interpolating the convolution's output):

* masked mode (training, the reference): the dense convolution, then the interpolation as a gather by the
  nearest-evaluated-position map (which reads only evaluated positions: equal to masking then interpolating);
* sparse mode (the mask is the same for the whole batch; a per-mask plan is cached, :func:`stage_plan`): at batch 1
  a *grid* mask (a Cartesian product of rows and columns) runs as one dense convolution, stride = kernel, over the
  input rows and columns its evaluated positions read (exactly the evaluated positions' MACs; measured faster than
  the gathers at batch 1, slower at batch 64); every other case through the pixel engine
  (:func:`dynnet.kernels.spatial.gather_conv_image`: the evaluated positions of the whole batch as one GEMM);
  batch norm is folded in; gathers and the interpolation (0 MACs) run on NHWC rows.
MACs: only evaluated positions count (``P_i · |W_i|`` per stage and sample); interpolation is a copy. Training is
fine-tuning of the perforated network in masked mode with plain cross-entropy (:meth:`PerforatedCNN.compute_loss`).

Departures from the paper:
* only the convolutions of residual branches are perforated (through the spatial engine's conv chains); the stem,
  shortcut convolutions and the classifier stay dense;
* masks are built for one input size (``input_size``); at another size the stored mask is resampled to the new
  grid by nearest neighbour (the paper builds masks per resolution);
* ``"pooling"``: ResNet branches have no pooling layer between convolutions, so the windows counted are those of
  the next convolution of the branch, and of a 3×3, stride-1 convolution after the last one (the next block's);
  ties between equally covered positions are broken at random;
* ``"grid"``: evenly spaced rows and columns (the paper draws them from a pseudo-random integer sequence), with
  the row and column counts whose product is closest to the requested count;
* ``"impact"``: one evaluated fraction for every layer, reached in ``rounds`` equal removal steps (the paper also
  allocates different rates to layers by a greedy search over the network's cost);
* the default ``budget = 1.0`` perforates nothing, so a fresh conversion reproduces the base network; choose the
  budget (or call :func:`set_perforation_` / :func:`impact_masks_`) to perforate.

Budget: calibrated (and fixed at conversion). ``budget`` is the target fraction of the dense MACs; the conversion
derives from it the evaluated fraction ``keep`` of every perforated convolution (one for all, by bisection on the
exact MAC count of the masks at ``input_size``: ``static + Σ_i |M_i| · |W_i| = budget · dense``) and builds the
masks; the value is kept in ``calibration[0]``. The MAC fraction does not depend on the input, so
:func:`dynnet.calibrate` only re-solves the same equation at the calibration images' size: its knob is ``keep``,
and it redraws every mask with the config's kind and seed (per-stage rates and impact masks are replaced).
Reachable: 0.1–1.0 (the stem, shortcut convolutions and classifier are not perforated; one position per
convolution is always evaluated).
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.blocks import SpatialResidual
from dynnet.convert import Targets, first_conv_in_channels, replace_module
from dynnet.core import (
    Decision,
    DynamicModel,
    LossOutput,
    Trace,
    current_trace,
    run_on_meta,
    tracing_or_compiling,
)
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.kernels.chain import chain_sizes
from dynnet.methods.spatial._common import spatial_targets
from dynnet.methods.spatial._perforation import (
    StagePlan,
    grid_mask,
    interpolation_maps,
    kept_count,
    nearest_interpolate,
    pooling_structure_mask,
    run_stage,
    stage_plan,
    uniform_mask,
)
from dynnet.testing.scramble import register_randomiser

__all__ = [
    "MASK_KINDS",
    "PerforatedBlock",
    "PerforatedCNN",
    "PerforatedCNNConfig",
    "PerforationMasks",
    "StagePlan",
    "grid_mask",
    "impact_masks_",
    "interpolation_maps",
    "nearest_interpolate",
    "pooling_structure_mask",
    "set_perforation_",
    "stage_plan",
    "uniform_mask",
]

MASK_KINDS = ("uniform", "grid", "pooling")
"""Mask kinds built from geometry alone; ``"impact"`` masks need data (:func:`impact_masks_`)."""

_MIN_KEEP = 1e-6
"""The smallest evaluated fraction set (masks keep at least one position whatever the fraction)."""


@dataclass(frozen=True)
class PerforatedCNNConfig:
    """Settings of PerforatedCNNs.

    Attributes:
        budget: target fraction of the dense MACs per image (at ``input_size``); the evaluated fraction of every
            perforated convolution (1 - the paper's perforation rate) is derived from it at conversion. 1.0 keeps
            every position (the base network).
        mask: ``"uniform"``, ``"grid"`` or ``"pooling"`` (impact masks: :func:`impact_masks_` after conversion).
        input_size: side of the (square) input the masks are built for.
        seed: seed of the random masks (uniform; tie-breaking of pooling-structure masks).
    """

    budget: float = 1.0
    mask: str = "uniform"
    input_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be a fraction in (0, 1] of the dense MACs, got {self.budget}")
        if self.mask not in MASK_KINDS:
            hint = " (impact masks need data: convert, then call impact_masks_)" if self.mask == "impact" else ""
            raise ValueError(f"mask must be one of {MASK_KINDS}, got {self.mask!r}{hint}")
        if self.input_size < 1:
            raise ValueError(f"input_size must be positive, got {self.input_size}")


# -- the masks module and the block --------------------------------------------------------------------------------

_DERIVED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[Tensor, int, Any]]] = weakref.WeakKeyDictionary()
"""Per masks module: data derived from a stage's mask (interpolation maps, execution plans), with the mask and
its version when it was derived."""


class PerforationMasks(nn.Module):
    """The perforation masks of one block's conv stages: buffers ``mask0``, ``mask1``, ... (Tensor[H_i, W_i] bool).

    Decisions are input-independent, so they are state of the model (like weights), not per-batch data.
    """

    def __init__(self, sizes: list[tuple[int, int]]) -> None:
        super().__init__()
        self.stages = len(sizes)
        for i, (h, w) in enumerate(sizes):
            self.register_buffer(f"mask{i}", torch.ones(h, w, dtype=torch.bool))

    def mask(self, i: int) -> Tensor:
        """The stored mask of stage ``i``."""
        return getattr(self, f"mask{i}")

    def set_mask_(self, i: int, mask: Tensor) -> None:
        """Replace stage ``i``'s mask (same shape, at least one position evaluated)."""
        old = self.mask(i)
        if tuple(mask.shape) != tuple(old.shape):
            raise ValueError(f"stage {i} needs a Tensor{list(old.shape)} mask, got {list(mask.shape)}")
        if not bool(mask.any()):
            raise ValueError(f"the mask of stage {i} must evaluate at least one position")
        with torch.no_grad():
            old.copy_(mask.to(old.device, torch.bool))

    def at(self, i: int, size: tuple[int, int]) -> Tensor:
        """Stage ``i``'s mask on an ``(H, W)`` grid: the stored one, or its nearest-neighbour resampling."""
        m = self.mask(i)
        if tuple(m.shape) == tuple(size):
            return m
        r = F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
        if not bool(r.any()):  # a downsampled sparse mask may lose every position: keep the centre
            r[size[0] // 2, size[1] // 2] = True
        return r

    def _cached(self, i: int, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()`` cached per stage ``i`` and ``key`` until stage ``i``'s mask changes (identity and version).

        The cache holds derived data only; it is built outside ``inference_mode`` because it outlives that context.
        """
        stored = self.mask(i)
        cache = _DERIVED.setdefault(self, {})
        hit = cache.get((i, *key))
        if hit is not None and hit[0] is stored and hit[1] == stored._version:
            return hit[2]
        with torch.inference_mode(False):
            value = build()
        cache[(i, *key)] = (stored, stored._version, value)
        return value

    def plan(self, i: int, mask: Tensor, geometry: tuple[int, int, int, int], in_size: tuple[int, int]) -> StagePlan:
        """:func:`stage_plan` of stage ``i`` (its mask at this size), cached per mask version like :meth:`maps`."""
        return self._cached(
            i,
            ("plan", tuple(mask.shape), tuple(in_size), geometry),
            lambda: stage_plan(mask.clone() if mask.is_inference() else mask, geometry, in_size),
        )

    def maps(self, i: int, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """``(mask, nearest, rank)`` of stage ``i`` at ``size`` (:func:`interpolation_maps`), cached per mask
        version (the cache holds derived data only; it is rebuilt whenever a mask changes)."""
        m = self.at(i, size)
        if tracing_or_compiling():
            return (m, *interpolation_maps(m, static=True))
        nearest, rank = self._cached(
            i, ("maps", tuple(size)), lambda: interpolation_maps(m.clone() if m.is_inference() else m)
        )
        return m, nearest, rank


class PerforatedBlock(SpatialResidual):
    """A residual block whose branch convolutions are evaluated at their perforation masks and interpolated."""

    granularity = "spatial"

    def _stage_maps(self, x: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        sizes = chain_sizes(self._stages, tuple(x.shape[2:]))[1:]
        return [self.gate.maps(i, s) for i, s in enumerate(sizes)]

    def forward_masked(self, x: Tensor, decision: Decision | None = None) -> Tensor:
        maps = self._stage_maps(x)
        h = x
        for st, (_, nearest, _) in zip(self._stages, maps, strict=True):
            h = st.conv(h)
            if st.bn is not None:
                h = st.bn(h)
            if st.act is not None:
                h = st.act(h)
            h = nearest_interpolate(h, nearest)  # reads only evaluated positions: mask, then interpolate
        out = self.post(self.shortcut(x) + h)
        self._record_perforated(x, maps, executed=None)
        return out

    def forward_sparse(self, x: Tensor, decision: Decision | None = None) -> Tensor:
        maps = self._stage_maps(x)
        n = x.shape[0]
        executed = torch.zeros(n, dtype=torch.float64, device=x.device)
        h = x
        for i, (st, (mask, _, rank)) in enumerate(zip(self._stages, maps, strict=True)):
            plan = self.gate.plan(i, mask, st.geometry, tuple(h.shape[2:]))
            h = run_stage(st, h, plan, rank)
            executed += float(plan.evaluated * st.per_position)
        out = self.post(self.shortcut(x) + h)
        self._record_perforated(x, maps, executed=executed)
        return out

    def _record_perforated(self, x: Tensor, maps: list[tuple[Tensor, Tensor, Tensor]], executed: Tensor | None) -> None:
        t = current_trace()
        if t is None:
            return
        n = x.shape[0]
        body = self._check_chain(x)
        macs = 0.0
        for i, (st, (mask, _, _)) in enumerate(zip(self._stages, maps, strict=True)):
            hard = mask.to(x.dtype if x.is_floating_point() else torch.float32).unsqueeze(0).expand(n, -1, -1)
            t.record_decision(f"{self.block_name}/conv{i + 1}", Decision(hard=hard, soft=None, granularity="spatial"))
            macs += float(mask.sum()) * st.per_position
        t.record_macs(
            f"{self.block_name}/body",
            macs,
            batch_size=n,
            executed=body if executed is None else executed,
            minimum=0.0,
            maximum=body,
            dense=body,
        )


# -- the model, conversion and mask setters ------------------------------------------------------------------------


class PerforatedCNN(DynamicModel):
    """The converted network. Objective: plain cross-entropy (fine-tuning of the perforated network)."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        task = F.cross_entropy(logits, target)
        return LossOutput(task, {"task": float(task.detach())})

    def perforated_blocks(self) -> list[PerforatedBlock]:
        """The perforated blocks, in execution order."""
        return [m for m in self.modules() if isinstance(m, PerforatedBlock)]

    def mask_mac_fraction(self) -> float:
        """The MAC fraction the stored masks spend at the size they were built for (``config.input_size``)."""
        dense, spent = self._dense_at_input_size(), 0.0
        for block in self.perforated_blocks():
            for i, st in enumerate(block._stages):
                mask = block.gate.mask(i)
                spent += (float(mask.sum()) - mask.numel()) * st.per_position
        return (dense + spent) / dense

    def _dense_at_input_size(self) -> float:
        s = self.config.input_size
        return float(self.dense_macs(torch.empty(1, self.in_channels or 3, s, s)))

    def perforate_to_(self, budget: float, *, tolerance: float = 1e-3) -> float:
        """Build masks of the config's kind whose MAC fraction at ``input_size`` is ``budget`` (one evaluated
        fraction for every convolution, found by bisection); returns that fraction (also in ``calibration[0]``)."""
        set_ = self._keep_setter()
        if budget >= 1.0:
            set_(1.0)
            return 1.0
        lo, hi, best = 0.0, 1.0, (1.0, 1.0)
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            set_(mid)
            f = self.mask_mac_fraction()
            if abs(f - budget) < abs(best[1] - budget):
                best = (mid, f)
            if abs(f - budget) <= tolerance / 2:
                break
            lo, hi = (mid, hi) if f < budget else (lo, mid)
        set_(best[0])
        return best[0]

    def _keep_setter(self) -> Callable[[float], None]:
        def set_(keep: float) -> None:
            set_perforation_(self, self.config.mask, max(float(keep), _MIN_KEEP), seed=self.config.seed)
            with torch.no_grad():
                self.calibration[0] = float(keep)

        return set_

    def budget_knob(self) -> Knob:
        """The evaluated fraction of every perforated convolution (the masks are redrawn with the config's kind and
        seed: nested as the fraction grows, so the MACs grow with it)."""
        return Knob("evaluated fraction", lambda: float(self.calibration[0]), self._keep_setter(), 0.0, 1.0)

    def calibrate_to_(self, batches: list[Tensor], budget: float, tolerance: float) -> dict[str, float]:
        """Bisection on the evaluated fraction; on failure the masks are put back as they were."""
        saved = [(b, i, b.gate.mask(i).clone()) for b in self.perforated_blocks() for i in range(b.gate.stages)]
        applied = self.calibration[0].clone()
        try:
            return super().calibrate_to_(batches, budget, tolerance)
        except ValueError:
            for b, i, mask in saved:
                b.gate.set_mask_(i, mask)
            with torch.no_grad():
                self.calibration[0] = applied
            raise


def _stage_names(model: nn.Module) -> list[tuple[PerforatedBlock, int, str]]:
    return [
        (b, i, f"{b.block_name}/conv{i + 1}")
        for b in model.modules()
        if isinstance(b, PerforatedBlock)
        for i in range(b.gate.stages)
    ]


def _keep_of(keep: float | Mapping[str, float], name: str) -> float:
    if isinstance(keep, Mapping):
        if name not in keep:
            raise KeyError(f"no evaluated fraction given for {name!r}; known stages are named '<block>/conv<i>'")
        return float(keep[name])
    return float(keep)


def _reader_geometry(block: PerforatedBlock, i: int) -> tuple[int, int, int]:
    """Kernel, stride, padding of what reads stage ``i``'s output: the next conv, or a 3×3 stride-1 conv."""
    if i + 1 < len(block._stages):
        k, s, p, _ = block._stages[i + 1].geometry
        return k, s, p
    return 3, 1, 1


def set_perforation_(
    model: nn.Module, kind: str, keep: float | Mapping[str, float], *, seed: int = 0
) -> dict[str, float]:
    """Set the perforation masks of every perforated convolution of ``model`` (in place).

    Args:
        model: a converted PerforatedCNN.
        kind: ``"uniform"``, ``"grid"`` or ``"pooling"``.
        keep: fraction of positions evaluated, one for all, or per stage name (``"layer1.0/conv1"``, ...).
        seed: seed of the random masks.

    Returns:
        The evaluated fraction each stage got (grid masks may differ slightly from ``keep``).
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r} (impact masks: impact_masks_)")
    g = torch.Generator().manual_seed(seed)
    rates = {}
    for block, i, name in _stage_names(model):
        size = tuple(block.gate.mask(i).shape)
        r = _keep_of(keep, name)
        if kind == "uniform":
            m = uniform_mask(size, r, g)
        elif kind == "grid":
            m = grid_mask(size, r)
        else:
            k, s, p = _reader_geometry(block, i)
            m = pooling_structure_mask(size, r, kernel=k, stride=s, padding=p, generator=g)
        block.gate.set_mask_(i, m)
        rates[name] = float(m.float().mean())
    return rates


def impact_masks_(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    keep: float | Mapping[str, float],
    *,
    rounds: int = 3,
) -> dict[str, Tensor]:
    """Impact perforation masks: greedily remove the positions of least estimated impact on the loss (in place).

    Starting from the current masks, each of ``rounds`` rounds accumulates over ``batches`` the first-order
    Taylor estimate of every position's impact, ``Σ_{n,c} |∂L/∂V · V|`` with ``V`` the convolution's output and
    ``L`` the cross-entropy of the perforated network (eval mode, masked execution), and removes the least
    important evaluated positions, so that after the last round each stage evaluates ``round(keep·H·W)``.
    Parameters' ``.grad`` are left alone (gradients are taken with ``torch.autograd.grad``).

    Args:
        model: a converted PerforatedCNN.
        batches: ``(x, y)`` pairs, iterated once per round (a list of a few batches).
        keep: fraction of positions evaluated, one for all, or per stage name.
        rounds: removal rounds.

    Returns:
        The accumulated impact of the last round per stage name (Tensor[H, W]).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    batches = list(batches)
    if not batches:
        raise ValueError("impact masks need at least one (x, y) batch")
    stages = _stage_names(model)
    targets = {name: kept_count(tuple(b.gate.mask(i).shape), _keep_of(keep, name)) for b, i, name in stages}
    was_training = model.training
    modes = {b: b.mode for b, _, _ in stages}
    model.eval()
    for b in modes:
        b.mode = "masked"
    scores: dict[str, Tensor] = {}
    try:
        for r in range(1, rounds + 1):
            scores = {name: torch.zeros(b.gate.mask(i).shape, dtype=torch.float64) for b, i, name in stages}
            for x, y in batches:
                outputs: dict[str, Tensor] = {}
                handles = [
                    b._stages[i].conv.register_forward_hook(
                        lambda _m, _a, out, key=name, store=outputs: store.__setitem__(key, out)
                    )
                    for b, i, name in stages
                ]
                try:
                    loss = F.cross_entropy(model(x), y)
                finally:
                    for hd in handles:
                        hd.remove()
                names = list(outputs)
                grads = torch.autograd.grad(loss, [outputs[k] for k in names], allow_unused=True)
                for k, g in zip(names, grads, strict=True):
                    if g is not None:
                        scores[k] += (g * outputs[k]).detach().abs().sum((0, 1)).double().cpu()
            for b, i, name in stages:
                mask = b.gate.mask(i)
                count = int(mask.sum())
                want = count - round((count - targets[name]) / (rounds - r + 1))
                flat = scores[name].reshape(-1).masked_fill(~mask.reshape(-1).cpu(), -math.inf)
                order = torch.sort(flat, descending=True, stable=True).indices[: max(want, 1)]
                new = torch.zeros(mask.numel(), dtype=torch.bool).index_fill_(0, order, True).view_as(mask)
                b.gate.set_mask_(i, new)
    finally:
        model.train(was_training)
        for b, mode in modes.items():
            b.mode = mode
    return {k: v.float() for k, v in scores.items()}


def _block_input_sizes(model: nn.Module, blocks: list[nn.Module], shape: tuple[int, int, int]) -> list[tuple[int, int]]:
    """The spatial size of each block's input when ``model`` runs a Tensor[N, *shape] (meta tensors: no compute)."""
    sizes: dict[int, tuple[int, int]] = {}

    def record(j: int):
        def hook(_m: nn.Module, args: tuple) -> None:  # returns None: the block's arguments stay as they are
            sizes.setdefault(j, tuple(args[0].shape[2:]))

        return hook

    handles = [b.register_forward_pre_hook(record(j)) for j, b in enumerate(blocks)]
    try:
        run_on_meta(model, lambda m, x: m(x), torch.empty((1, *shape)))
    finally:
        for hd in handles:
            hd.remove()
    missing = [j for j in range(len(blocks)) if j not in sizes]
    if missing:
        raise RuntimeError(f"blocks {missing} did not run on a {shape} input")
    return [sizes[j] for j in range(len(blocks))]


@recipe(
    "perforated_cnn",
    paper="PerforatedCNNs: Acceleration through Elimination of Redundant Convolutions (NeurIPS 2016), "
    "arXiv:1504.08362",
    budget=BudgetPolicy("calibrated", knob="evaluated fraction", reachable=(0.1, 1.0),
                        derives="evaluated fraction (1 - perforation rate) of every perforated convolution, solved "
                                "on the masks' exact MACs at input_size",
                        # standard profile, 2026-12-07: trained at 0.5 (92.98 %), calibrated to 0.75: 90.59 %
                        transfers=False),
    input_dependent=False,
)  # fmt: skip
def convert(model: nn.Module, config: PerforatedCNNConfig, targets: Targets = "auto") -> PerforatedCNN:
    """Perforate the branch convolutions of every target residual block of ``model`` (in place)."""
    found = spatial_targets(model, targets, depthwise=False)
    in_channels = first_conv_in_channels(model)
    shape = (in_channels or 3, config.input_size, config.input_size)
    in_sizes = _block_input_sizes(model, [b for _, b, _, _ in found], shape)
    for (name, block, adapter, stages), size in zip(found, in_sizes, strict=True):
        masks = PerforationMasks(chain_sizes(stages, size)[1:])
        new = PerforatedBlock(block, adapter, stages, masks, execution="pixel")
        new.block_name = name
        replace_module(model, name, new)
    net = PerforatedCNN(model, recipe="perforated_cnn", config=copy.copy(config), in_channels=in_channels)
    net.perforate_to_(config.budget)
    return net


@register_randomiser(PerforatedCNN)
def _randomise(model: PerforatedCNN, generator: torch.Generator) -> int:
    """Random uniform masks for every stage; returns their number. A perforated stage keeps its number of
    evaluated positions (the budget stays, the positions change); an unperforated one evaluates 20-80 %.

    The conformance suite's scrambling: the masks are the decisions, and they are not parameters.
    """
    changed = 0
    for block in model.perforated_blocks():
        for i in range(block.gate.stages):
            mask = block.gate.mask(i)
            size = tuple(mask.shape)
            keep = float(mask.float().mean())
            if keep >= 1.0:
                keep = 0.2 + 0.6 * float(torch.rand((), generator=generator))
            block.gate.set_mask_(i, uniform_mask(size, keep, generator))
            changed += 1
    return changed
