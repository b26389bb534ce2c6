"""Straight-through estimators (Bengio, Léonard & Courville 2013, arXiv:1308.3432)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["straight_through", "straight_through_sigmoid"]


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """A tensor equal to ``hard`` in the forward pass whose gradient flows to ``soft``.

    Args:
        hard: Tensor[...] discrete values (no gradient needed).
        soft: Tensor[...] differentiable relaxation of the same shape.
    """
    # hard + (soft - soft) keeps the forward value exactly equal to hard in floating point.
    return hard.detach() + (soft - soft.detach())


def straight_through_sigmoid(
    logits: Tensor, *, stochastic: bool = False, threshold: float = 0.5, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Binary decisions from logits with the straight-through sigmoid estimator.

    Args:
        logits: Tensor[...] gate logits.
        stochastic: sample ``hard ~ Bernoulli(sigmoid(logits))`` instead of thresholding.
        threshold: probability above which a deterministic decision is 1.
        generator: random generator for the stochastic case.

    Returns:
        ``(hard_st, prob)``: the straight-through decision (values 0/1, gradient of ``prob``) and
        ``prob = sigmoid(logits)``.
    """
    prob = torch.sigmoid(logits)
    if stochastic:
        hard = torch.bernoulli(prob.detach(), generator=generator)
    else:
        hard = (prob.detach() > threshold).to(prob.dtype)
    return straight_through(hard, prob), prob
