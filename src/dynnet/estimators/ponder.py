"""Adaptive computation time: halting and ponder cost (Graves 2016), as pure functions.

"Adaptive Computation Time for Recurrent Neural Networks", Graves, arXiv 2016,
https://arxiv.org/abs/1603.08983.

A unit ``n = 1..L`` emits a halting probability ``h_n``; a sample stops at
``N = min{n : sum_{k<=n} h_k >= 1 - eps}`` (the last unit always halts), its remainder is
``R = 1 - sum_{n<N} h_n``, the weights of the units are ``p_n = h_n`` (n < N), ``p_N = R``, 0 after, and the
ponder cost is ``rho = N + R`` (its gradient is ``-1`` for each ``h_n``, n < N).

:func:`halts` is the incremental rule (used while iterating, so halted samples can leave the batch);
:func:`act_weights` computes everything from a full Tensor[N, L] of halting probabilities (masked mode,
oracles); :func:`straight_through_select` turns the weights into a hard selection of the halting unit's
state with Graves's mean-field gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ActWeights", "act_weights", "halts", "ponder_cost", "straight_through_select"]


def halts(cumulative: Tensor, h: Tensor, eps: float = 0.01) -> Tensor:
    """Which samples halt at this unit: ``cumulative + h >= 1 - eps``, Tensor[N] bool.

    Args:
        cumulative: Tensor[N] sum of the halting probabilities of the previous units.
        h: Tensor[N] halting probability of this unit.
        eps: Graves's epsilon (> 0, so that one unit can halt alone).
    """
    return (cumulative.detach() + h.detach()) >= 1.0 - eps


@dataclass(frozen=True)
class ActWeights:
    """The halting of a batch.

    Attributes:
        steps: Tensor[N] int64, ``N`` — the unit (1-based) at which each sample halts.
        weights: Tensor[N, L], ``p_n`` (differentiable; each row sums to 1).
        remainder: Tensor[N], ``R`` (differentiable).
        ran: Tensor[N, L] 0/1, whether the sample ran unit n (``n <= N``).
    """

    steps: Tensor
    weights: Tensor
    remainder: Tensor
    ran: Tensor


def act_weights(h: Tensor, eps: float = 0.01) -> ActWeights:
    """ACT halting from the halting probabilities of every unit.

    Args:
        h: Tensor[N, L] halting probabilities; the last column is ignored (the last unit always halts).
        eps: Graves's epsilon.
    """
    if h.dim() != 2:
        raise ValueError(f"h must be Tensor[N, L], got shape {tuple(h.shape)}")
    n, length = h.shape
    cumulative = torch.zeros(n, dtype=h.dtype, device=h.device)
    running = torch.ones(n, dtype=torch.bool, device=h.device)
    weights, ran = [], []
    remainder = torch.zeros(n, dtype=h.dtype, device=h.device)
    steps = torch.full((n,), length, dtype=torch.long, device=h.device)
    for k in range(length):
        stop = running & (halts(cumulative, h[:, k], eps) if k < length - 1 else torch.ones_like(running))
        r = 1.0 - cumulative
        p = torch.where(stop, r, torch.where(running, h[:, k], torch.zeros_like(r)))
        weights.append(p)
        ran.append(running.to(h.dtype))
        remainder = torch.where(stop, r, remainder)
        steps = torch.where(stop, torch.full_like(steps, k + 1), steps)
        cumulative = cumulative + torch.where(running & ~stop, h[:, k], torch.zeros_like(r))
        running = running & ~stop
    return ActWeights(steps, torch.stack(weights, 1), remainder, torch.stack(ran, 1))


def ponder_cost(steps: Tensor, remainder: Tensor) -> Tensor:
    """Graves's ponder cost ``rho = N + R`` per sample, Tensor[N] (gradient through ``R`` only)."""
    return steps.to(remainder.dtype) + remainder


def straight_through_select(weights: Tensor, steps: Tensor) -> Tensor:
    """Hard one-hot of the halting unit in the forward pass with the gradient of Graves's weights.

    ``states`` combined with this selection (``sum_n sel_n x_n``) equal the halting unit's state exactly in the
    forward pass, while the halting probabilities receive the mean-field gradient ``x_n - x_N``.

    Args:
        weights: Tensor[N, L] ACT weights ``p_n`` (differentiable).
        steps: Tensor[N] int64 halting units (1-based).

    Returns:
        Tensor[N, L].
    """
    hard = torch.zeros_like(weights).scatter_(1, (steps - 1).unsqueeze(1), 1.0)
    return hard + (weights - weights.detach())
