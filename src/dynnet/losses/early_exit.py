"""Losses of early-exit networks, as pure functions of the exits' logits (first exit first)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "adaptive_exit_targets",
    "exit_distillation_loss",
    "exit_mixture",
    "expected_exit_cost",
    "multi_exit_cross_entropy",
    "weighted_policy_loss",
]


def multi_exit_cross_entropy(exit_logits: Sequence[Tensor], target: Tensor, weights: Sequence[float]) -> Tensor:
    """``sum_k w_k CE(z_k, y)`` — the joint objective of BranchyNet (weighted) and MSDNet (uniform weights).

    Args:
        exit_logits: K tensors Tensor[N, C].
        target: Tensor[N] class indices.
        weights: K non-negative weights.
    """
    if len(exit_logits) != len(weights):
        raise ValueError(f"{len(exit_logits)} exits but {len(weights)} weights")
    return torch.stack([w * F.cross_entropy(z, target) for z, w in zip(exit_logits, weights, strict=True)]).sum()


def exit_distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, batch mean; the teacher gets no gradient.

    IMTA's one-for-all distillation applies it with the last exit as teacher of every earlier exit.

    Args:
        student: Tensor[N, C] logits.
        teacher: Tensor[N, C] logits.
        temperature: T > 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_p = F.log_softmax(student / temperature, 1)
    q = F.softmax(teacher.detach() / temperature, 1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def exit_mixture(confidences: Sequence[Tensor]) -> Tensor:
    """Probability that each sample stops at each exit when exit ``k`` stops it with probability ``h_k``.

    ``P_k = h_k prod_{j<k} (1 - h_j)`` and the last exit takes the rest (EENets' output combination).

    Args:
        confidences: K - 1 tensors Tensor[N] in [0, 1] (the early exits' stopping probabilities).

    Returns:
        Tensor[N, K]; rows sum to 1.
    """
    alive = torch.ones_like(confidences[0])
    cols = []
    for h in confidences:
        cols.append(alive * h)
        alive = alive * (1.0 - h)
    cols.append(alive)
    return torch.stack(cols, 1)


def expected_exit_cost(stop_probs: Tensor, exit_costs: Tensor) -> Tensor:
    """Tensor[N]: ``sum_k P_k c_k`` for stop probabilities Tensor[N, K] and costs Tensor[K] of stopping at k."""
    return stop_probs @ exit_costs.to(stop_probs.dtype)


def adaptive_exit_targets(
    exit_losses: Tensor, exit_costs: Tensor, downstream: Tensor, cost_weight: float
) -> tuple[Tensor, Tensor]:
    """Labels and weights of the early-exit policies of Bolukbasi et al. (ICML 2017), from the last exit back.

    The cost of stopping at exit ``k`` is ``loss_k + λ c_k``; the cost of continuing is the cost of what the
    downstream policies do: ``V_{K-1} = loss_{K-1} + λ c_{K-1}`` and ``V_k = γ_k (loss_k + λ c_k) + (1 - γ_k)
    V_{k+1}`` with ``γ_k`` the current (hard) decision of policy ``k``. Policy ``k`` is then a weighted binary
    classifier: label ``1[stop cost < continue cost]``, weight ``|stop cost - continue cost|``.

    Args:
        exit_losses: Tensor[N, K] per-sample loss of each exit (the paper's 0-1 error, or cross-entropy).
        exit_costs: Tensor[K] cost of stopping at each exit, as a fraction of the dense network.
        downstream: Tensor[N, K - 1] current 0/1 decisions of the policies (1 = exit).
        cost_weight: λ, the price of one dense network's MACs in units of the loss.

    Returns:
        ``(labels, weights)``: Tensor[N, K - 1] each, no gradient.
    """
    losses = exit_losses.detach().double()
    costs = exit_costs.detach().double().to(losses.device)
    stop = losses + cost_weight * costs.view(1, -1)
    k_last = losses.shape[1] - 1
    value = stop[:, k_last]
    labels, weights = [], []
    for k in range(k_last - 1, -1, -1):
        labels.append((stop[:, k] < value).float())
        weights.append((stop[:, k] - value).abs().float())
        g = downstream[:, k].detach().double()
        value = g * stop[:, k] + (1.0 - g) * value
    return torch.stack(labels[::-1], 1), torch.stack(weights[::-1], 1)


def weighted_policy_loss(policy_logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """Weighted binary cross-entropy of exit policies: Tensor[N, K - 1] each → scalar (normalised by N)."""
    bce = F.binary_cross_entropy_with_logits(policy_logits, labels, reduction="none")
    return (weights * bce).sum() / policy_logits.shape[0]
