"""The estimators for stochastic binary units compared by Bengio, Léonard & Courville (2013), as pure functions.

"Estimating or Propagating Gradients Through Stochastic Neurons for Conditional Computation", arXiv 2013,
https://arxiv.org/abs/1308.3432. Each function maps pre-activations ``a`` (Tensor[...]) to
``(hard, value, prob)``:

* ``hard`` — the 0/1 decision with a straight-through gradient (what MAC costs are built from);
* ``value`` — what the unit outputs (the gate multiplier): equal to ``hard`` for binary units, ``b · sqrt(p)`` for
  stochastic-times-smooth units and ``max(0, a + z)`` for noisy rectifiers; zero exactly where ``hard`` is 0;
* ``prob`` — the probability of the unit being on (``sigmoid(a)``).

The fourth estimator of the paper, the unbiased (REINFORCE-style) one, has no pathwise gradient:
:func:`unbiased_binary` samples ``b ~ Bernoulli(sigmoid(a))`` and the caller trains ``a`` with
:func:`dynnet.estimators.reinforce.reinforce_loss` of :func:`dynnet.estimators.reinforce.bernoulli_log_prob`.
At inference (``sample=False``) every unit is deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynnet.estimators.straight_through import straight_through

__all__ = ["noisy_rectifier", "st_binary", "stochastic_times_smooth", "unbiased_binary"]


def st_binary(
    a: Tensor, *, sample: bool = True, identity: bool = False, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Straight-through stochastic binary unit: ``b ~ Bernoulli(sigmoid(a))`` (``sigmoid(a) > 1/2`` at inference).

    Args:
        a: Tensor[...] pre-activations.
        sample: sample (training) or threshold (inference).
        identity: back-propagate ``d b / d a = 1`` (the paper's plain straight-through) instead of the
            derivative of the sigmoid (the variant the paper finds best).
        generator: random generator.
    """
    p = torch.sigmoid(a)
    b = torch.bernoulli(p.detach(), generator=generator) if sample else (p.detach() > 0.5).to(p.dtype)
    hard = straight_through(b, a if identity else p)
    return hard, hard, p


def stochastic_times_smooth(
    a: Tensor, *, sample: bool = True, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Stochastic-times-smooth unit ``h = b · sqrt(p)`` with ``p = sigmoid(a)``, ``b ~ Bernoulli(sqrt(p))``.

    ``E[h] = p``; the gradient flows through the smooth factor ``sqrt(p)`` only (``b`` is treated as a constant),
    as in the paper. At inference ``b = [sqrt(p) > 1/2]``.
    """
    p = torch.sigmoid(a)
    root = torch.sqrt(p)
    b = torch.bernoulli(root.detach(), generator=generator) if sample else (root.detach() > 0.5).to(p.dtype)
    return straight_through(b, root), b * root, p


def noisy_rectifier(
    a: Tensor, *, sample: bool = True, noise_std: float = 1.0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Noisy rectifier ``h = max(0, a + z)``, ``z ~ N(0, noise_std^2)`` (no noise at inference).

    Exact zeros switch the unit off; the gradient is the rectifier's. ``hard = [h > 0]`` carries the gradient of
    ``sigmoid(a)`` (a smooth proxy for the probability of being on) so that budget losses can act on it.
    """
    z = torch.randn(a.shape, dtype=a.dtype, device=a.device, generator=generator) * noise_std if sample else 0.0
    h = torch.relu(a + z)
    p = torch.sigmoid(a)
    return straight_through((h.detach() > 0).to(a.dtype), p), h, p


def unbiased_binary(
    a: Tensor, *, sample: bool = True, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Binary unit for the unbiased (REINFORCE) estimator: ``b ~ Bernoulli(p)`` without pathwise gradient."""
    p = torch.sigmoid(a)
    b = torch.bernoulli(p.detach(), generator=generator) if sample else (p.detach() > 0.5).to(p.dtype)
    return b, b, p
