"""Gumbel-Softmax / Gumbel-Sigmoid (Jang et al. 2017; Maddison et al. 2017) with hard straight-through."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dynnet.estimators.straight_through import straight_through

__all__ = ["gumbel_sigmoid", "gumbel_softmax", "sample_gumbel"]

_EPS = 1e-10


def sample_gumbel(
    shape: torch.Size | tuple[int, ...], *, like: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Standard Gumbel noise, Tensor[shape], with the dtype and device of ``like``."""
    u = torch.rand(shape, dtype=like.dtype, device=like.device, generator=generator)
    return -torch.log(-torch.log(u + _EPS) + _EPS)


def gumbel_softmax(
    logits: Tensor, tau: float = 1.0, *, hard: bool = True, noise: bool = True, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Categorical decisions over the last dim of ``logits``.

    Args:
        logits: Tensor[..., K] unnormalised log-probabilities.
        tau: temperature (> 0).
        hard: return one-hot forward values with the soft gradient (straight-through).
        noise: add Gumbel noise (training); without it, the decision is the argmax (inference).
        generator: random generator for the noise.

    Returns:
        ``(sample, probs)``: Tensor[..., K] one-hot (or relaxed) sample and ``softmax(logits)``.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    probs = F.softmax(logits, dim=-1)
    perturbed = logits + sample_gumbel(logits.shape, like=logits, generator=generator) if noise else logits
    soft = F.softmax(perturbed / tau, dim=-1)
    if not hard:
        return soft, probs
    index = soft.argmax(dim=-1, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(-1, index, 1.0)
    return straight_through(one_hot, soft), probs


def gumbel_sigmoid(
    logits: Tensor, tau: float = 1.0, *, hard: bool = True, noise: bool = True, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Binary decisions: the two-class Gumbel-Softmax written with one logit per decision.

    Args:
        logits: Tensor[...] logit of "on".
        tau: temperature (> 0).
        hard: 0/1 forward values with the relaxed gradient.
        noise: add logistic noise (difference of two Gumbels); off at inference (threshold at 0).
        generator: random generator.

    Returns:
        ``(sample, prob)`` of the shape of ``logits``: the decision and ``sigmoid(logits)``.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    prob = torch.sigmoid(logits)
    if noise:
        g = sample_gumbel(logits.shape, like=logits, generator=generator) - sample_gumbel(
            logits.shape, like=logits, generator=generator
        )
        logits = logits + g
    soft = torch.sigmoid(logits / tau)
    if not hard:
        return soft, prob
    return straight_through((soft > 0.5).to(soft.dtype), soft), prob
