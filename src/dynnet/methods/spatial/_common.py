"""Helpers shared by the spatial recipes: which blocks they convert, and the output stride of a chain."""

from __future__ import annotations

from torch import nn

from dynnet.convert import ResidualAdapter, Targets, residual_blocks
from dynnet.kernels._spatial_chain import ConvStage, spatial_chain

__all__ = ["chain_stride", "spatial_targets"]


def spatial_targets(
    model: nn.Module, targets: Targets
) -> list[tuple[str, nn.Module, ResidualAdapter, list[ConvStage]]]:
    """The residual blocks of ``model`` whose branch the spatial engine can split into conv stages."""
    found = [(n, b, a, st) for n, b, a in residual_blocks(model, targets) if (st := spatial_chain(b)) is not None]
    if not found:
        raise ValueError(
            f"no residual block of {type(model).__name__} has a known conv chain (BasicBlock/Bottleneck); "
            "register one with dynnet.kernels._spatial_chain.register_spatial_chain"
        )
    return found


def chain_stride(stages: list[ConvStage]) -> int:
    """Total stride of a chain of conv stages (the block's output stride)."""
    s = 1
    for st in stages:
        s *= st.geometry[1]
    return s
