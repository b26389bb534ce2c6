"""Pieces every early-exit recipe shares: the state type, exit scores, gradient scaling, the budget's exit
profile and loss weights, a per-sample MAC probe, and the exit heads.

The rest of the family's machinery lives beside it: :mod:`._trunk` (cutting a base network into units and placing
the exits), :mod:`._cascade` (:class:`~dynnet.methods.early_exit._cascade.ExitCascade`, the dynamic block) and
:mod:`._model` (:class:`~dynnet.methods.early_exit._model.EarlyExitModel`, the converted model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.kernels.compaction import index_select_rows
from dynnet.macs import MacCounter

__all__ = [
    "NEVER",
    "ConvBranchHead",
    "PooledLinearHead",
    "State",
    "budget_exit_weights",
    "count_per_sample",
    "entropy_confidence",
    "geometric_exit_shares",
    "gradient_rescale",
    "max_softmax_confidence",
    "select",
]

NEVER = math.inf
"""Threshold of an exit that no sample takes (scores are finite)."""

State = Any  # a Tensor[N, ...] or a tuple of them (multi-scale networks)


# ------------------------------------------------------------------------------------ meta-tensor probes
def count_per_sample(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), MACs per sample)`` for a call on a meta batch of 2."""
    with MacCounter() as c:
        out = fn()
    if c.total % 2:
        raise RuntimeError(f"MACs are not linear in the batch size ({c.total} for 2)")
    return out, c.total // 2


# -------------------------------------------------------------------------------------- pure functions
def select(state: State | None, idx: Tensor) -> State | None:
    """Rows ``idx`` of a state (Tensor[N, ...], a tuple of them, or ``None``)."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return index_select_rows(state, idx)
    return type(state)(index_select_rows(s, idx) for s in state)


def max_softmax_confidence(logits: Tensor) -> Tensor:
    """Tensor[N, K] logits → Tensor[N] maximum softmax probability, in [1/K, 1]."""
    return logits.float().softmax(1).amax(1)


def entropy_confidence(logits: Tensor) -> Tensor:
    """Tensor[N, K] logits → Tensor[N] ``1 - H(softmax) / log K`` in [0, 1] (BranchyNet exits when the
    entropy is low, i.e. when this confidence is high)."""
    logp = logits.float().log_softmax(1)
    entropy = -(logp.exp() * logp).sum(1)
    return 1.0 - entropy / math.log(logits.shape[1])


class _GradientRescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def gradient_rescale(x: Tensor, scale: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` (IMTA's gradient equilibrium)."""
    return _GradientRescale.apply(x, scale)


def geometric_exit_shares(stop_costs: Sequence[float] | Tensor, budget: float, *, iters: int = 80) -> Tensor:
    """MSDNet's budgeted-batch exit profile for a budget: the share ``q_k ∝ p^k`` of the samples that stop at exit
    ``k``, with ``p`` such that the mean cost ``Σ_k q_k c_k`` equals ``budget``.

    Args:
        stop_costs: Tensor[K] cost of stopping at exit ``k`` (increasing; any unit, e.g. a fraction of the dense
            MACs, the unit of ``budget``).
        budget: target mean cost. Below ``c_0`` every sample stops at the first exit; above ``c_{K-1}`` at the
            last.
        iters: bisection steps on ``log p``.

    Returns:
        Tensor[K] float64 shares, summing to 1.
    """
    c = [float(v) for v in torch.as_tensor(stop_costs, dtype=torch.float64).flatten()]

    def shares(log_p: float) -> list[float]:  # softmax of k · log p, in plain floats (called every training step)
        top = max(0.0, log_p * (len(c) - 1))
        e = [math.exp(k * log_p - top) for k in range(len(c))]
        total = sum(e)
        return [v / total for v in e]

    lo, hi = -40.0, 40.0
    if budget <= c[0]:
        return torch.tensor(shares(lo), dtype=torch.float64)
    if budget >= c[-1]:
        return torch.tensor(shares(hi), dtype=torch.float64)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if sum(q * v for q, v in zip(shares(mid), c, strict=True)) > budget:
            hi = mid
        else:
            lo = mid
    return torch.tensor(shares(0.5 * (lo + hi)), dtype=torch.float64)


def budget_exit_weights(stop_costs: Sequence[float] | Tensor, budget: float) -> list[float]:
    """Loss weights of the exits derived from a budget: ``w_k = (1 + K q_k) / 2`` (mean 1).

    Half the uniform weights of the anytime objective (every exit equally good), half the share ``q_k`` of the
    samples that exit ``k`` will serve at the budget (:func:`geometric_exit_shares`, the profile that calibration
    fits): at a small budget the early exits, which answer most images, weigh more; at a large one the late exits.
    Every weight stays at least 1/2, so every exit (and the trunk under it) keeps training.

    Args:
        stop_costs: Tensor[K] cost of stopping at exit ``k``, as a fraction of the dense MACs.
        budget: target mean fraction of the dense MACs per image.
    """
    q = geometric_exit_shares(stop_costs, budget)
    return [float(w) for w in 0.5 * (1.0 + q.numel() * q)]


# ---------------------------------------------------------------------------------------------- heads
class PooledLinearHead(nn.Module):
    """Global average pool → Linear: Tensor[N, C, H, W] → logits Tensor[N, K] (CDL's linear classifiers)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class ConvBranchHead(nn.Module):
    """A side branch: ``depth`` × (conv3×3 → BN → ReLU), global average pool, Linear.

    Tensor[N, C, H, W] → logits Tensor[N, K]. The first conv is strided when the map is larger than 8×8 so
    that the branch stays cheap next to the trunk (BranchyNet's branches are one or two conv layers).
    """

    def __init__(self, in_channels: int, num_classes: int, *, width: int, depth: int = 1, stride: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(depth):
            layers += [
                nn.Conv2d(c, width, 3, stride if i == 0 else 1, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            c = width
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.body(h), 1).flatten(1))
