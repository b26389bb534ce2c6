"""Batch compaction: run a function only on the samples that need it.

Used by layer skipping (skipped samples do not enter the block) and early exits (exited samples
leave the batch). The gather (``index_select``) and scatter (``index_add``/``index_copy``) cost
memory traffic but no MACs.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["compact_add", "compact_apply"]


def compact_add(fn: Callable[[Tensor], Tensor], x: Tensor, keep: Tensor, base: Tensor) -> Tensor:
    """``base + keep[:, None, ...] * fn(x)`` computing ``fn`` only on the kept samples.

    Args:
        fn: batch-wise function whose output has ``base``'s shape for the same samples.
        x: Tensor[N, ...] input of ``fn``.
        keep: Tensor[N] bool or exactly 0/1 — which samples run ``fn``.
        base: Tensor[N, ...] what every sample gets (e.g. the shortcut); never modified in place.

    Returns:
        Tensor[N, ...]. Costs nothing when no sample is kept and runs ``fn`` on the whole batch,
        without gathers, when all are.
    """
    if x.shape[0] == 1:  # batch 1: a branch, no index tensors
        return base + fn(x) if bool(keep) else base
    idx = keep.nonzero().squeeze(1)
    k = idx.numel()
    if k == 0:
        return base
    if k == x.shape[0]:
        return base + fn(x)
    return base.index_add(0, idx, fn(x.index_select(0, idx)))


def compact_apply(fn: Callable[[Tensor], Tensor], x: Tensor, idx: Tensor) -> Tensor:
    """``fn(x[idx])``, skipping the gather when ``idx`` is the whole batch in order.

    Args:
        fn: batch-wise function.
        x: Tensor[N, ...].
        idx: Tensor[M] long indices of the samples to run.
    """
    if idx.numel() == x.shape[0]:
        return fn(x)
    return fn(x.index_select(0, idx))
