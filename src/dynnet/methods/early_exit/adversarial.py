"""PGD attacks on multi-exit networks (pure functions), used by Triple Wins and its robust evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["average_exit_loss", "pgd_attack"]


def average_exit_loss(exit_logits: list[Tensor], target: Tensor, weights: Sequence[float] | None = None) -> Tensor:
    """Mean over exits of the cross-entropy — the objective of Triple Wins' "average-exit" attack.

    Args:
        exit_logits: K tensors Tensor[N, C], first exit first.
        target: Tensor[N] class indices.
        weights: K weights of the exits' cross-entropies (``None``: all 1), for ``(1 / K) Σ_k w_k CE_k``.
    """
    ce = torch.stack([F.cross_entropy(z, target) for z in exit_logits])
    if weights is None:
        return ce.mean()
    if len(weights) != len(exit_logits):
        raise ValueError(f"{len(exit_logits)} exits but {len(weights)} weights")
    return (ce * torch.tensor(list(weights), dtype=ce.dtype, device=ce.device)).mean()


def pgd_attack(
    loss_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """L∞ projected gradient ascent (Madry et al., ICLR 2018) on ``loss_fn(x_adv)``.

    Args:
        loss_fn: Tensor[N, C, H, W] → scalar loss to maximise.
        x: Tensor[N, C, H, W] clean inputs (any normalisation; ``epsilon`` is in the same units).
        epsilon: radius of the L∞ ball.
        step_size: size of each signed-gradient step.
        steps: iterations (0 returns ``x``).
        random_start: start from a uniform point of the ball.
        generator: random generator of the start.

    Returns:
        Tensor[N, C, H, W] adversarial inputs, detached, within ``epsilon`` of ``x``.
    """
    x = x.detach()
    if steps <= 0 or epsilon <= 0:
        return x
    delta = torch.zeros_like(x)
    if random_start:
        delta = (torch.rand(x.shape, generator=generator, device="cpu").to(x) * 2 - 1) * epsilon
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(x + delta)
            (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-epsilon, epsilon)
    return (x + delta).detach()
