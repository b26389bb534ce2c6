"""Schedules as pure functions of training progress: learning rate, estimator temperature, budget target."""

from __future__ import annotations

import math

__all__ = ["budget_at", "lr_factor", "tau_at"]


def lr_factor(step: int, total_steps: int, *, warmup_steps: int = 0, cosine: bool = True) -> float:
    """Multiplier of the peak learning rate before optimiser step ``step`` (0-based).

    Linear warmup from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps`` steps, then cosine decay to 0
    at ``total_steps`` (or constant 1 without ``cosine``).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if not cosine:
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def tau_at(progress: float, start: float, end: float | None, *, kind: str = "exponential") -> float:
    """Estimator temperature at ``progress`` ∈ [0, 1] of the run.

    Args:
        progress: fraction of the optimiser steps done (clamped to [0, 1]).
        start: temperature at 0.
        end: temperature at 1 (``None``: constant ``start``).
        kind: ``"exponential"`` — ``start · (end / start) ** progress`` — or ``"linear"``.
    """
    if end is None:
        return float(start)
    p = min(1.0, max(0.0, float(progress)))
    if kind == "exponential":
        return float(start * (end / start) ** p)
    if kind == "linear":
        return float(start + (end - start) * p)
    raise ValueError(f"tau schedule must be 'exponential' or 'linear', got {kind!r}")


def budget_at(
    epoch: float, target: float | None, *, start: float | None = None, warmup_epochs: float = 0.0
) -> float | None:
    """Budget target at (fractional) ``epoch``: linear from ``start`` to ``target`` over ``warmup_epochs``.

    Returns ``target`` itself when there is no annealing (``start`` is ``None`` or ``warmup_epochs`` is 0);
    ``None`` (the model's own budget) when ``target`` is ``None``.
    """
    if target is None or start is None or warmup_epochs <= 0:
        return target
    p = min(1.0, max(0.0, epoch / warmup_epochs))
    return float(start + (target - start) * p)
