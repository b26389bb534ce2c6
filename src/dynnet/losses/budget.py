"""Budget losses: per-gate target rates and the global MAC budget."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dynnet.core.decision import Decision

__all__ = ["mac_budget_loss", "target_rate_loss"]


def target_rate_loss(decisions: Iterable[Decision], target: float) -> Tensor:
    """ConvNet-AIG's target-rate loss: ``sum_g (mean_n z_{g,n} - target)^2``.

    Args:
        decisions: binary decisions whose ``hard`` is the straight-through value, Tensor[N] or Tensor[N, ...].
        target: the desired execution rate of every gate, in (0, 1].
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
        raise ValueError(f"target rate (budget) must be a fraction in (0, 1], got {target!r}")
    terms = [(d.hard.float().mean() - target) ** 2 for d in decisions]
    if not terms:
        raise ValueError("target_rate_loss needs at least one decision")
    return torch.stack(terms).sum()


def mac_budget_loss(macs: Tensor, dense: float, target: float) -> Tensor:
    """``(mean_n macs_n / dense - target)^2`` for Tensor[N] per-sample MACs (float32 result)."""
    return ((macs.mean() / dense).float() - target) ** 2
