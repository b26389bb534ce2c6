"""Batch compaction: run a function only on the samples that need it.

Used by layer skipping (skipped samples do not enter the block) and early exits (exited samples
leave the batch). The gather (``index_select``) and scatter (``index_add``/``index_copy``) cost
memory traffic but no MACs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["compact_add", "compact_apply", "index_add_rows", "index_select_rows"]


def _channels_last(t: Tensor) -> bool:
    """A 4-d tensor laid out channels-last (and not also NCHW-contiguous, as 1×1 maps are)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def index_select_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x.index_select(0, idx)`` keeping a channels-last ``x`` channels-last.

    A channels-last Tensor[N, C, H, W] is a contiguous Tensor[N, H, W, C] in memory: the gather runs on that view
    (a plain block copy per sample) instead of PyTorch's strided path, which is several times slower and returns
    NCHW, so that the next convolution would convert it back.
    """
    if _channels_last(x):
        return x.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
    return x.index_select(0, idx)


def index_add_rows(base: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    """``base.index_add(0, idx, src)`` (out of place) keeping a channels-last ``base`` channels-last (see
    :func:`index_select_rows`: PyTorch's strided ``index_add`` is ~10× slower on channels-last tensors)."""
    if _channels_last(base):
        src = src.contiguous(memory_format=torch.channels_last)
        return base.permute(0, 2, 3, 1).index_add(0, idx, src.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return base.index_add(0, idx, src)


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
    return index_add_rows(base, idx, fn(index_select_rows(x, idx)))


def compact_apply(fn: Callable[[Tensor], Tensor], x: Tensor, idx: Tensor) -> Tensor:
    """``fn(x[idx])``, skipping the gather when ``idx`` is the whole batch in order.

    Args:
        fn: batch-wise function.
        x: Tensor[N, ...].
        idx: Tensor[M] long indices of the samples to run.
    """
    if idx.numel() == x.shape[0]:
        return fn(x)
    return fn(index_select_rows(x, idx))
