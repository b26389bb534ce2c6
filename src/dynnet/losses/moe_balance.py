"""Load-balancing losses of the sparsely-gated mixture of experts (Shazeer et al., ICLR 2017, §4 and App. A).

Pure functions of the router's outputs for one batch:

* :func:`importance_loss` — ``CV(sum_n G(x_n))^2``: experts should receive equal total gate weight;
* :func:`load_loss` — ``CV(sum_n P(x_n, e))^2`` with the smooth load estimator ``P`` of Appendix A, the
  probability that expert ``e`` stays in the top-k when only its own noise is resampled.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cv_squared", "importance_loss", "load_loss", "prob_in_top_k"]

_EPS = 1e-10


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation ``var(v) / mean(v)^2`` of Tensor[E] (0 for a single value)."""
    if values.numel() <= 1:
        return values.sum() * 0.0
    v = values.float()
    return v.var(unbiased=False) / (v.mean() ** 2 + _EPS)


def importance_loss(gates: Tensor) -> Tensor:
    """Shazeer's importance loss ``CV(Importance)^2`` with ``Importance_e = sum_n gates[n, e]``.

    Args:
        gates: Tensor[N, E] gate values (zero for experts outside the top-k).
    """
    return cv_squared(gates.sum(0))


def prob_in_top_k(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """``P(x, e)``: probability that expert ``e`` is in the top-k when its noise alone is resampled.

    Args:
        clean: Tensor[N, E] clean router logits ``x W_g``.
        noisy: Tensor[N, E] logits with the sampled noise, ``clean + eps * noise_std``.
        noise_std: Tensor[N, E] positive noise scales ``softplus(x W_noise)``.
        k: experts per sample (``k < E``).

    Returns:
        Tensor[N, E]: ``Phi((clean - kth_excluding(noisy, k, e)) / noise_std)`` where the threshold is the
        (k+1)-th largest noisy logit for experts currently in the top-k and the k-th largest otherwise.
    """
    e = noisy.shape[1]
    if not 0 < k < e:
        raise ValueError(f"k must be in (0, {e}), got {k}")
    top = noisy.topk(k + 1, dim=1).values
    kth_in, kth_out = top[:, k : k + 1], top[:, k - 1 : k]
    is_in = noisy > kth_in  # strictly above the (k+1)-th value: in the top-k
    normal = torch.distributions.Normal(torch.zeros((), device=clean.device), torch.ones((), device=clean.device))
    p_in = normal.cdf((clean - kth_in) / noise_std)
    p_out = normal.cdf((clean - kth_out) / noise_std)
    return torch.where(is_in, p_in, p_out)


def load_loss(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """Shazeer's load loss ``CV(Load)^2`` with the smooth estimator ``Load_e = sum_n P(x_n, e)``.

    Args: as :func:`prob_in_top_k`.
    """
    return cv_squared(prob_in_top_k(clean, noisy, noise_std, k).sum(0))
