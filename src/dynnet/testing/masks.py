"""Masks for property tests of the sparse kernels."""

from __future__ import annotations

import torch

__all__ = ["MASK_KINDS", "make_mask"]

MASK_KINDS = ("random", "empty", "full")


def make_mask(kind: str, density: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Tensor[shape] bool: all off (``"empty"``), all on (``"full"``) or each entry on with probability ``density``
    (``"random"``)."""
    if kind == "empty":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "full":
        return torch.ones(shape, dtype=torch.bool)
    if kind != "random":
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
    return torch.rand(shape, generator=generator) < density
