"""Helpers shared by the spatial recipes: which blocks they convert, the output stride of a chain, and the
execution rate at which a network spends its MAC budget."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dynnet.blocks import no_spatial_chain, spatial_chain
from dynnet.convert import ResidualAdapter, Targets, residual_blocks
from dynnet.core import Trace
from dynnet.kernels.chain import ConvStage

__all__ = ["chain_stride", "rate_for_budget", "spatial_targets"]


def spatial_targets(
    model: nn.Module, targets: Targets, *, depthwise: bool = True
) -> list[tuple[str, nn.Module, ResidualAdapter, list[ConvStage]]]:
    """The residual blocks of ``model`` whose branch the spatial engine can split into conv stages, squeeze-excitations
    included (with ``depthwise=False``, only branches of dense convolutions without one: recipes with their own
    per-convolution kernels)."""
    blocks = residual_blocks(model, targets)
    chains = [(n, b, a, spatial_chain(b, depthwise=depthwise, squeeze=depthwise)) for n, b, a in blocks]
    found = [(n, b, a, st) for n, b, a, st in chains if st is not None]
    if not found:
        raise no_spatial_chain(model, [b for _, b, _ in blocks], "this spatial recipe", depthwise=depthwise)
    return found


def chain_stride(stages: list[ConvStage]) -> int:
    """Total stride of a chain of conv stages (the block's output stride)."""
    s = 1
    for st in stages:
        s *= st.geometry[1]
    return s


def rate_for_budget(t: Trace, budget: float, dynamic: Callable[[str], bool], *, floor: float = 0.01) -> float:
    """The execution rate ``r`` of the gated parts at which a network spends ``budget`` of its dense MACs.

    The gated parts (entries whose name ``dynamic`` accepts) are assumed to cost ``min + r · (max - min)`` per
    sample; every other part (static layers, gates, interpolation) costs what it cost in ``t``. Solving
    ``fixed + Σ min + r · Σ (max - min) = budget · dense`` gives ``r``, clamped to ``[floor, 1]``. It is the per-gate
    target rate a target-rate loss needs for its rate to mean the MAC budget (DynConv-style dilated masks make the
    real cost slightly higher than linear: the global MAC term and calibration settle the rest).

    Args:
        t: the trace of a forward pass.
        budget: target mean fraction of the dense MACs.
        dynamic: which entries scale with the rate (``lambda name: name.endswith("/body")``).
        floor: the smallest rate returned (target-rate losses need a rate in (0, 1]).
    """
    fixed, lo, span = 0.0, 0.0, 0.0
    for e in t.entries:
        if dynamic(e.name):
            lo += e.minimum
            span += e.maximum - e.minimum
        else:
            fixed += float(e.macs.detach().double().mean())
    if span <= 0:
        return 1.0
    r = (budget * t.dense_macs() - fixed - lo) / span
    return min(1.0, max(floor, r))
