"""Confidence-threshold exit gates, shared by the recipes that stop when confident (RANet, GFNet, ...).

A sample leaves at the first exit whose maximum softmax probability reaches that exit's threshold; the last
exit takes everyone left. Thresholds are calibrated on held-out data so that a chosen fraction of samples
leaves at each exit (MSDNet / RANet's budgeted batch classification).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["confidence", "exit_fractions_for_rate", "thresholds_for_fractions"]


def confidence(logits: Tensor) -> Tensor:
    """Maximum softmax probability of Tensor[N, K] logits: Tensor[N]."""
    return logits.detach().float().softmax(-1).amax(-1)


def exit_fractions_for_rate(num_exits: int, q: float) -> Tensor:
    """Fraction of samples leaving at each exit, ``p_s ∝ q^s`` (MSDNet's geometric schedule): Tensor[S]."""
    if q <= 0:
        raise ValueError(f"q must be positive, got {q}")
    p = torch.tensor([q**s for s in range(num_exits)], dtype=torch.float64)
    return p / p.sum()


def thresholds_for_fractions(confidences: Tensor, fractions: Tensor) -> Tensor:
    """Thresholds that let ``fractions[s]`` of the samples leave at exit ``s``.

    Args:
        confidences: Tensor[N, S] confidence of every sample at every exit (all exits evaluated).
        fractions: Tensor[S] non-negative, summing to 1.

    Returns:
        Tensor[S - 1] thresholds of the first S - 1 exits (``inf`` where no sample should leave).
    """
    n, s = confidences.shape
    if fractions.shape != (s,):
        raise ValueError(f"expected {s} fractions, got shape {tuple(fractions.shape)}")
    remaining = torch.ones(n, dtype=torch.bool)
    thresholds = torch.full((s - 1,), float("inf"))
    for i in range(s - 1):
        want = round(float(fractions[i]) * n)
        conf = confidences[remaining, i]
        if want > 0 and conf.numel() > 0:
            want = min(want, conf.numel())
            thresholds[i] = conf.sort(descending=True).values[want - 1]
            remaining &= ~(confidences[:, i] >= thresholds[i])
    return thresholds
