"""Improved semantic hashing (Kaiser & Bengio, "Discrete Autoencoders for Sequence Models", arXiv 2018, §2.2),
the binary-gate estimator of GaterNet. https://arxiv.org/abs/1801.09797

Training: Gaussian noise is added to the logits, ``v = a + n``; the relaxed value is the saturating sigmoid
``s(v) = clamp(1.2 · sigmoid(v) - 0.1, 0, 1)`` and the binary value ``b = [v > 0]``; each unit outputs ``s`` or
``b`` (with the gradient of ``s``) with probability 1/2. Inference: ``b = [a > 0]`` without noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynnet.estimators.straight_through import straight_through

__all__ = ["improved_semhash", "saturating_sigmoid"]


def saturating_sigmoid(v: Tensor) -> Tensor:
    """``clamp(1.2 · sigmoid(v) - 0.1, 0, 1)``."""
    return (1.2 * torch.sigmoid(v) - 0.1).clamp(0.0, 1.0)


def improved_semhash(
    a: Tensor, *, sample: bool = True, noise_std: float = 1.0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Improved semantic hashing of Tensor[...] logits.

    Args:
        a: logits.
        sample: training behaviour (noise and the random relaxed/binary mix); inference thresholds at 0.
        noise_std: standard deviation of the Gaussian noise.
        generator: random generator.

    Returns:
        ``(value, prob)``: the gate values (binary everywhere at inference; in training a mix of relaxed values in
        [0, 1] and straight-through binary values) and ``sigmoid(a)``.
    """
    prob = torch.sigmoid(a)
    if not sample:
        return (a.detach() > 0).to(a.dtype), prob
    v = a + torch.randn(a.shape, dtype=a.dtype, device=a.device, generator=generator) * noise_std
    relaxed = saturating_sigmoid(v)
    binary = straight_through((v.detach() > 0).to(a.dtype), relaxed)
    use_binary = torch.rand(a.shape, device=a.device, generator=generator) < 0.5
    return torch.where(use_binary, binary, relaxed), prob
