"""REINFORCE (Williams 1992) for discrete decisions, with moving-average or self-critical baselines.

"Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement Learning",
Machine Learning 8 (1992), https://doi.org/10.1007/BF00992696. The self-critical baseline is from
Rennie et al., "Self-Critical Sequence Training for Image Captioning", CVPR 2017, arXiv:1612.00563.

Everything here is a pure function: the policy samples with :func:`sample_bernoulli`, the objective is
:func:`reinforce_loss` of the log-probability of what was sampled, and a baseline is either the result of
:func:`moving_average` (a running mean kept by the caller, e.g. in a buffer) or the reward of the greedy
decisions (:func:`self_critical_advantage`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "bernoulli_entropy",
    "bernoulli_log_prob",
    "moving_average",
    "reinforce_loss",
    "sample_bernoulli",
    "self_critical_advantage",
]

_EPS = 1e-6


def sample_bernoulli(prob: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """0/1 samples of ``Bernoulli(prob)`` (no gradient), Tensor of ``prob``'s shape and dtype."""
    return torch.bernoulli(prob.detach(), generator=generator)


def bernoulli_log_prob(prob: Tensor, action: Tensor) -> Tensor:
    """Log-probability of independent binary ``action``\\ s, summed over every dim but the first.

    Args:
        prob: Tensor[N, ...] probabilities of 1 (differentiable).
        action: Tensor[N, ...] 0/1 actions of the same shape (no gradient).

    Returns:
        Tensor[N]: ``sum_k a_k log p_k + (1 - a_k) log(1 - p_k)`` per sample.
    """
    if prob.shape != action.shape:
        raise ValueError(f"prob and action must have the same shape, got {tuple(prob.shape)} and {tuple(action.shape)}")
    p = prob.clamp(_EPS, 1 - _EPS)
    a = action.detach().to(p.dtype)
    lp = a * torch.log(p) + (1 - a) * torch.log1p(-p)
    return lp.reshape(lp.shape[0], -1).sum(1)


def bernoulli_entropy(prob: Tensor) -> Tensor:
    """Entropy of independent Bernoullis, summed over every dim but the first: Tensor[N]."""
    p = prob.clamp(_EPS, 1 - _EPS)
    h = -(p * torch.log(p) + (1 - p) * torch.log1p(-p))
    return h.reshape(h.shape[0], -1).sum(1)


def reinforce_loss(
    log_prob: Tensor,
    reward: Tensor,
    baseline: Tensor | float = 0.0,
    *,
    entropy: Tensor | None = None,
    entropy_weight: float = 0.0,
) -> Tensor:
    """The surrogate whose gradient is the REINFORCE estimate of ``-grad E[reward]`` (minus an entropy bonus).

    ``loss = -mean_n (r_n - b_n) log pi(a_n) - entropy_weight * mean_n H_n``; the advantage ``r - b`` is
    detached, so only the policy's log-probabilities receive gradients. Any baseline that does not depend on
    the sampled action keeps the estimate unbiased.

    Args:
        log_prob: Tensor[N] log-probability of the sampled actions (differentiable).
        reward: Tensor[N] reward of each sample.
        baseline: Tensor[N], a scalar tensor or a float.
        entropy: Tensor[N] entropy of the policy (differentiable), for the exploration bonus.
        entropy_weight: weight of the entropy bonus (>= 0).

    Returns:
        A scalar tensor to minimise.
    """
    if log_prob.dim() != 1 or reward.shape != log_prob.shape:
        raise ValueError(
            f"log_prob and reward must both be Tensor[N], got {tuple(log_prob.shape)} and {tuple(reward.shape)}"
        )
    advantage = (reward - baseline).detach().to(log_prob.dtype)
    loss = -(advantage * log_prob).mean()
    if entropy is not None and entropy_weight:
        loss = loss - entropy_weight * entropy.mean()
    return loss


def moving_average(baseline: Tensor, reward: Tensor, momentum: float = 0.9) -> Tensor:
    """The next value of an exponential moving-average baseline: ``m * b + (1 - m) * mean(reward)``.

    Args:
        baseline: scalar tensor, the current baseline (a buffer the caller owns).
        reward: Tensor[N] rewards of the batch.
        momentum: in [0, 1).
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    return momentum * baseline + (1.0 - momentum) * reward.detach().mean().to(baseline.dtype)


def self_critical_advantage(reward: Tensor, greedy_reward: Tensor) -> Tensor:
    """Self-critical advantage ``r(sampled) - r(greedy)``, Tensor[N] (no gradient)."""
    return (reward - greedy_reward).detach()
