"""Confidence-threshold exit gates, shared by the recipes that stop when confident (RANet, GFNet, ...).

A sample leaves at the first exit whose maximum softmax probability reaches that exit's threshold; the last
exit takes everyone left. Thresholds are calibrated on held-out data so that a chosen fraction of samples
leaves at each exit (MSDNet / RANet's budgeted batch classification). For a MAC budget the fractions follow MSDNet's
geometric profile ``p_s ∝ q^s`` with the rate ``q`` whose mean cost is the budget: :func:`exit_fractions_for_budget`
(from the exits' costs alone) and :func:`exit_rate_for_budget` (from held-out confidences, which sets thresholds).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "confidence",
    "exit_fractions_for_budget",
    "exit_fractions_for_rate",
    "exit_rate_for_budget",
    "exit_taken",
    "thresholds_for_fractions",
]

_LOG_Q = (-12.0, 12.0)  # rates searched: from everyone at the first exit to everyone at the last


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


def exit_taken(confidences: Tensor, thresholds: Tensor) -> Tensor:
    """Exit each sample leaves at: the first ``s`` with ``confidences[:, s] >= thresholds[s]`` (else the last).

    Args:
        confidences: Tensor[N, S].
        thresholds: Tensor[S - 1].

    Returns:
        Tensor[N] int64.
    """
    last = torch.ones((confidences.shape[0], 1), dtype=torch.bool, device=confidences.device)
    leave = torch.cat([confidences[:, :-1] >= thresholds.to(confidences), last], 1)
    return leave.to(torch.int8).argmax(1).long()


def _profile_cost(costs: Tensor, log_q: float) -> float:
    return float((exit_fractions_for_rate(len(costs), math.exp(log_q)) * costs).sum())


def exit_fractions_for_budget(costs: Tensor, budget: float) -> Tensor:
    """MSDNet's geometric exit profile ``p_s ∝ q^s`` whose expected cost is ``budget``.

    Args:
        costs: Tensor[S] increasing cost of leaving at exit ``s`` (e.g. its MAC fraction: every stage up to ``s``).
        budget: the target expected cost, in the unit of ``costs``.

    Returns:
        Tensor[S] float64 fractions summing to 1 (all at the first exit when ``budget <= costs[0]``, all at the last
        when ``budget >= costs[-1]``).
    """
    c = costs.detach().double().cpu()
    lo, hi = _LOG_Q
    if budget <= _profile_cost(c, lo):
        return exit_fractions_for_rate(len(c), math.exp(lo))
    if budget >= _profile_cost(c, hi):
        return exit_fractions_for_rate(len(c), math.exp(hi))
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _profile_cost(c, mid) < budget else (lo, mid)
    return exit_fractions_for_rate(len(c), math.exp(0.5 * (lo + hi)))


def exit_rate_for_budget(
    confidences: Tensor, costs: Tensor, budget: float, *, tolerance: float = 0.0, iters: int = 60
) -> tuple[float, Tensor, float]:
    """Thresholds from held-out confidences whose exits follow ``p_s ∝ q^s`` with the mean cost ``budget``.

    The rate ``q`` is bisected (in ``log q``) on the mean cost the thresholds give on these samples, which is a
    monotone step function of ``q``; the search stops within ``tolerance / 2`` or keeps the closest value.

    Args:
        confidences: Tensor[N, S] confidence of every sample at every exit (all exits evaluated).
        costs: Tensor[S] cost of leaving at exit ``s`` (e.g. its MAC fraction).
        budget: target mean cost, in the unit of ``costs``.
        tolerance: how close the mean cost must come.
        iters: most bisection steps.

    Returns:
        ``(log_q, thresholds Tensor[S - 1], mean cost on these samples)``.

    Raises:
        ValueError: ``budget`` lies outside the mean costs the thresholds reach on these samples (one line, with
            the range).
    """
    c = costs.detach().double().cpu()
    conf = confidences.detach().float().cpu()
    s = conf.shape[1]

    def at(log_q: float) -> tuple[Tensor, float]:
        thr = thresholds_for_fractions(conf, exit_fractions_for_rate(s, math.exp(log_q)))
        return thr, float(c[exit_taken(conf, thr)].mean())

    lo, hi = _LOG_Q
    (thr_lo, f_lo), (thr_hi, f_hi) = at(lo), at(hi)
    if not f_lo - tolerance <= budget <= f_hi + tolerance:
        raise ValueError(
            f"budget {budget:.3f} is outside the mean costs [{f_lo:.3f}, {f_hi:.3f}] that the exit thresholds reach "
            f"on these images: choose a budget in that range"
        )
    best = min(((lo, thr_lo, f_lo), (hi, thr_hi, f_hi)), key=lambda b: abs(b[2] - budget))
    for _ in range(iters):
        if abs(best[2] - budget) <= tolerance / 2:
            break
        mid = 0.5 * (lo + hi)
        thr, f = at(mid)
        if abs(f - budget) < abs(best[2] - budget):
            best = (mid, thr, f)
        lo, hi = (mid, hi) if f < budget else (lo, mid)
    return best
