"""Batch-shaping loss (Bejnordi, Blankevoort & Welling, ICLR 2020, §3.1), as pure functions.

"Batch-Shaping for Learning Conditional Channel Gated Networks", https://arxiv.org/abs/1907.06627.

For every gate, the empirical CDF of its relaxed values over a batch is pulled towards the CDF of a Beta prior:
with ``x_(1) <= ... <= x_(N)`` the sorted values, ``L = sum_i (i / (N + 1) - F(x_(i); a, b))^2``. The Beta CDF
(the regularised incomplete beta function, which torch lacks) is :func:`beta_cdf`; its derivative in ``x`` is
the Beta density, which is what the loss backpropagates.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["batch_shaping_loss", "beta_cdf", "beta_log_norm"]

_EPS = 1e-6
# Gauss–Legendre nodes on [0, 1] for the integral (smooth after the substitutions below).
_NODES, _WEIGHTS = (torch.as_tensor(v, dtype=torch.float64) for v in np.polynomial.legendre.leggauss(64))
_NODES, _WEIGHTS = (_NODES + 1) / 2, _WEIGHTS / 2


def beta_log_norm(a: float, b: float) -> float:
    """``log B(a, b)``."""
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _lower_cdf(x: Tensor, a: float, b: float) -> Tensor:
    """``I_x(a, b)`` for x in (0, 1/2]: with ``t = u^{1/a}``, ``int_0^x t^{a-1}(1-t)^{b-1} dt
    = (1/a) int_0^{x^a} (1 - u^{1/a})^{b-1} du``, whose integrand is smooth on that range."""
    upper = x.pow(a)  # Tensor[M]
    u = upper[:, None] * _NODES.to(x.device)[None, :]
    integrand = (1 - u.pow(1 / a)).pow(b - 1)
    integral = (integrand * _WEIGHTS.to(x.device)).sum(1) * upper / a
    return integral * math.exp(-beta_log_norm(a, b))


class _BetaCDF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, a: float, b: float) -> Tensor:  # type: ignore[override]
        xd = x.detach().double().clamp(_EPS, 1 - _EPS)
        flat = xd.reshape(-1)
        low = flat <= 0.5
        out = torch.empty_like(flat)
        if bool(low.any()):
            out[low] = _lower_cdf(flat[low], a, b)
        if bool((~low).any()):
            out[~low] = 1 - _lower_cdf(1 - flat[~low], b, a)
        ctx.save_for_backward(xd)
        ctx.ab = (a, b)
        return out.view_as(xd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (xd,) = ctx.saved_tensors
        a, b = ctx.ab
        log_pdf = (a - 1) * torch.log(xd) + (b - 1) * torch.log1p(-xd) - beta_log_norm(a, b)
        return grad * log_pdf.exp().to(grad.dtype), None, None


def beta_cdf(x: Tensor, a: float, b: float) -> Tensor:
    """The Beta(a, b) CDF ``I_x(a, b)`` elementwise, differentiable in ``x`` (gradient: the Beta density).

    Args:
        x: Tensor[...] values in [0, 1] (clamped to [1e-6, 1 - 1e-6]).
        a, b: positive shape parameters.
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"Beta parameters must be positive, got a={a}, b={b}")
    return _BetaCDF.apply(x, float(a), float(b))


def batch_shaping_loss(gates: Tensor, a: float = 0.6, b: float = 0.4) -> Tensor:
    """Batch-shaping loss summed over gates.

    Args:
        gates: Tensor[N, G] relaxed gate values in [0, 1] (one column per gate), N >= 2.
        a, b: Beta prior (Beta(0.6, 0.4) in the paper: each gate is on for ~60 % of a batch, and mostly 0 or 1).

    Returns:
        Scalar ``sum_g sum_i (i / (N + 1) - F(x_(i),g))^2`` divided by ``N`` (so the scale does not grow with N).
    """
    if gates.dim() != 2 or gates.shape[0] < 2:
        raise ValueError(f"gates must be Tensor[N, G] with N >= 2, got shape {tuple(gates.shape)}")
    n = gates.shape[0]
    ordered = torch.sort(gates, dim=0).values
    empirical = torch.arange(1, n + 1, dtype=gates.dtype, device=gates.device)[:, None] / (n + 1)
    return ((empirical - beta_cdf(ordered, a, b)) ** 2).sum() / n
