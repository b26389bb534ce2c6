"""Pieces shared by the glimpse recipes: glimpse extraction, Gaussian location policies, REINFORCE.

The policy gradient uses :func:`dynnet.estimators.reinforce.reinforce_loss`; confidence-threshold exits
come from :mod:`dynnet.gates.confidence`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dynnet.estimators.reinforce import reinforce_loss

__all__ = [
    "crop_glimpse",
    "gaussian_log_prob",
    "policy_gradient_losses",
    "retina_glimpse",
]


def crop_glimpse(x: Tensor, loc: Tensor, size: int) -> Tensor:
    """Square patches of ``size`` pixels centred at ``loc``, read with bilinear sampling (0 MACs, zero padding).

    Args:
        x: Tensor[N, C, H, W] images.
        loc: Tensor[N, 2] centres ``(x, y)`` in normalised coordinates ``[-1, 1]`` (``align_corners=False``).
        size: patch side in input pixels.

    Returns:
        Tensor[N, C, size, size]; a centre on the pixel grid with an integer patch reads pixels exactly.
    """
    h, w = x.shape[-2:]
    # Offsets of the patch's pixel centres from its centre, in normalised units (2 / W per pixel).
    r = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    ox, oy = r * (2.0 / w), r * (2.0 / h)
    gx = loc[:, 0, None, None].to(x.dtype) + ox[None, None, :]
    gy = loc[:, 1, None, None].to(x.dtype) + oy[None, :, None]
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def retina_glimpse(x: Tensor, loc: Tensor, size: int, num_scales: int) -> Tensor:
    """RAM's retina: ``num_scales`` patches of side ``size * 2^s`` centred at ``loc``, each average-pooled to
    ``size × size`` (lower resolution further out) and stacked on channels: Tensor[N, C * num_scales, size, size].
    """
    patches = []
    for s in range(num_scales):
        p = crop_glimpse(x, loc, size * 2**s)
        patches.append(p if s == 0 else F.avg_pool2d(p, 2**s))
    return torch.cat(patches, 1)


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: float) -> Tensor:
    """Log-density of ``sample`` under N(mean, std² I), summed over the last dim: Tensor[N]."""
    var = std**2
    return (-((sample - mean) ** 2) / (2 * var) - math.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)


def policy_gradient_losses(log_prob: Tensor, reward: Tensor, baseline: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """REINFORCE over the steps taken, with a learned baseline (Williams 1992).

    Args:
        log_prob: Tensor[N, T] log-probability of the action taken at each step.
        reward: Tensor[N] or Tensor[N, T] return that followed each action.
        baseline: Tensor[N, T] predicted return (trained by regression; detached in the policy term).
        mask: Tensor[N, T] bool, the steps that were taken.

    Returns:
        ``(policy_loss, baseline_loss)``: :func:`dynnet.estimators.reinforce.reinforce_loss` over the taken
        steps and the mean squared error of the baseline on them.
    """
    r = reward.detach()
    if r.dim() == 1:
        r = r[:, None].expand_as(baseline)
    m = mask.bool()
    policy = reinforce_loss(log_prob[m], r[m].to(log_prob.dtype), baseline[m].detach())
    value = ((r[m] - baseline[m]) ** 2).mean()
    return policy, value
