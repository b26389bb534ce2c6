"""One-step Q-learning over a sequence of decisions (Watkins & Dayan 1992), as pure functions.

Used by Runtime Neural Pruning and Runtime Network Routing, whose agents take one action per layer: the
Q-value of the action taken at step ``t`` regresses onto ``r_t + gamma · max_a Q_{t+1}(a)`` (the bootstrap is
detached), and onto ``r_T`` at the last step.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["epsilon_greedy", "q_learning_loss", "td_targets"]


def epsilon_greedy(q: Tensor, epsilon: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Actions Tensor[N] long: ``argmax_a q`` with probability ``1 - epsilon``, a uniform action otherwise.

    Args:
        q: Tensor[N, A] Q-values.
        epsilon: exploration rate in [0, 1] (0 at inference: greedy, deterministic).
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")
    greedy = q.detach().argmax(1)
    if epsilon == 0.0:
        return greedy
    n, a = q.shape
    explore = torch.rand(n, device=q.device, generator=generator) < epsilon
    random = torch.randint(0, a, (n,), device=q.device, generator=generator)
    return torch.where(explore, random, greedy)


def td_targets(q_values: list[Tensor], rewards: list[Tensor], gamma: float) -> list[Tensor]:
    """Targets ``y_t = r_t + gamma · max_a Q_{t+1}(a)`` (``y_T = r_T``), each Tensor[N], detached.

    Args:
        q_values: T tensors Tensor[N, A_t] (the Q-values at every step).
        rewards: T tensors Tensor[N] (the reward received after the action of every step).
        gamma: discount in [0, 1].
    """
    if len(q_values) != len(rewards) or not q_values:
        raise ValueError(f"need one reward per step, got {len(q_values)} Q-values and {len(rewards)} rewards")
    targets = []
    for t, r in enumerate(rewards):
        y = r.detach()
        if t + 1 < len(q_values):
            y = y + gamma * q_values[t + 1].detach().max(1).values.to(y.dtype)
        targets.append(y)
    return targets


def q_learning_loss(q_values: list[Tensor], actions: list[Tensor], rewards: list[Tensor], gamma: float) -> Tensor:
    """Mean squared TD error ``mean_t mean_n (Q_t(a_t) - y_t)^2``.

    Args:
        q_values: T tensors Tensor[N, A] (differentiable).
        actions: T tensors Tensor[N] long, the actions taken.
        rewards: T tensors Tensor[N].
        gamma: discount.
    """
    targets = td_targets(q_values, rewards, gamma)
    errors = []
    for q, a, y in zip(q_values, actions, targets, strict=True):
        taken = q.gather(1, a.view(-1, 1)).squeeze(1)
        errors.append(((taken - y.to(taken.dtype)) ** 2).mean())
    return torch.stack(errors).mean()
