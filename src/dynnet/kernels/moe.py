"""Mixture-of-experts dispatch: run each expert only on the samples routed to it.

The reference is :func:`dense_combine` (every expert on every sample, weighted sum); :func:`dispatch_add` gives
the same result while each expert sees only its own samples: the (sample, choice) pairs are sorted by expert,
each expert runs once on the gathered rows, and the weighted outputs are scatter-added back. Gathers, sorts and
scatter-adds cost memory traffic but no MACs. :func:`capacity_keep` implements the capacity factor of
GShard / Switch Transformer (batch-prioritised routing: first choices are served before second choices).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dynnet.kernels.compaction import index_add_rows, index_select_rows

__all__ = ["capacity_keep", "dense_combine", "dispatch_add", "expert_capacity", "expert_counts"]

Expert = Callable[[Tensor], Tensor]


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * num_tokens * k / num_experts)`` (GShard / Switch)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
    return math.ceil(capacity_factor * num_tokens * k / num_experts)


def capacity_keep(index: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Which routed (sample, choice) pairs fit in their expert's capacity.

    Pairs are served choice by choice (all first choices, then all second choices, ...), in sample order within
    a choice, so a sample loses its first choice only when ``capacity`` samples before it chose the same expert.

    Args:
        index: Tensor[N, k] long expert of each choice; values outside ``[0, num_experts)`` (e.g. ``-1`` or a
            zero-computation expert) are not routed and are kept (they use no slot).
        num_experts: E, the experts that have a capacity.
        capacity: slots per expert.

    Returns:
        Tensor[N, k] bool.
    """
    n, k = index.shape
    flat = index.t().reshape(-1)  # choice-major order = serving priority
    routed = (flat >= 0) & (flat < num_experts)
    one_hot = torch.zeros(flat.numel(), num_experts, dtype=torch.long, device=index.device)
    one_hot[routed] = torch.nn.functional.one_hot(flat[routed], num_experts)
    position = (one_hot.cumsum(0) * one_hot).sum(1)  # 1-based slot taken by each routed pair
    keep = ~routed | (position <= capacity)
    return keep.view(k, n).t()


def expert_counts(index: Tensor, num_experts: int) -> Tensor:
    """Tensor[E] float: how many samples each expert receives (entries outside ``[0, E)`` are ignored)."""
    flat = index.reshape(-1)
    flat = flat[(flat >= 0) & (flat < num_experts)]
    return torch.bincount(flat, minlength=num_experts).float()


def dispatch_add(
    experts: Sequence[Expert], x: Tensor, index: Tensor, weight: Tensor, base: Tensor | None = None
) -> Tensor:
    """``base + sum_j weight[:, j] * experts[index[:, j]](x)``, running each expert on its samples only.

    Args:
        experts: E batch-wise functions with outputs of ``base``'s per-sample shape.
        x: Tensor[N, ...] input.
        index: Tensor[N, k] long; an entry outside ``[0, E)`` means "no expert" (skipped or dropped).
        weight: Tensor[N, k] combination weights.
        base: Tensor[N, ...] what every sample gets (e.g. the shortcut); not modified in place. ``None``: zeros
            shaped like the experts' outputs (then at least one pair must be routed).

    Returns:
        Tensor[N, ...]. Equal to :func:`dense_combine` with the corresponding dense gates.
    """
    n, k = index.shape
    if weight.shape != index.shape:
        raise ValueError(
            f"index and weight must have the same shape, got {tuple(index.shape)} and {tuple(weight.shape)}"
        )
    flat = index.reshape(-1)
    routed = (flat >= 0) & (flat < len(experts))
    pair = routed.nonzero().squeeze(1)
    expert_of_pair = flat.index_select(0, pair)
    order = torch.argsort(expert_of_pair, stable=True)
    pair, expert_of_pair = pair.index_select(0, order), expert_of_pair.index_select(0, order)
    counts = torch.bincount(expert_of_pair, minlength=len(experts)).tolist()
    rows = torch.div(pair, k, rounding_mode="floor")
    w = weight.reshape(-1).index_select(0, pair)
    out, start = base, 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        r, we = rows[start : start + c], w[start : start + c]
        y = experts[e](x if c == n and bool((r == torch.arange(n, device=r.device)).all()) else index_select_rows(x, r))
        if out is None:
            out = y.new_zeros((n, *y.shape[1:]))
        out = index_add_rows(out, r, y * we.view(-1, *([1] * (y.dim() - 1))).to(y.dtype))
        start += c
    if out is None:
        raise ValueError("dispatch_add without a base needs at least one routed (sample, expert) pair")
    return out


def dense_combine(experts: Sequence[Expert], x: Tensor, gates: Tensor, base: Tensor) -> Tensor:
    """Reference: ``base + sum_e gates[:, e] * experts[e](x)`` with every expert run on every sample.

    Args:
        experts: E batch-wise functions.
        x: Tensor[N, ...].
        gates: Tensor[N, E'] with ``E' >= E``; columns beyond E (zero-computation experts) are ignored.
        base: Tensor[N, ...].
    """
    out = base
    for e, fn in enumerate(experts):
        y = fn(x)
        out = out + gates[:, e].view(-1, *([1] * (y.dim() - 1))).to(y.dtype) * y
    return out
