"""Instance-wise feature sparsity (Liu, Wang, Han, Xu & Xu, IJCAI 2019, §3), as pure functions.

"Learning Instance-wise Sparsity for Accelerating Deep Models", https://arxiv.org/abs/1907.11840.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["channel_norms", "feature_l21", "instance_keep_mask"]


def channel_norms(h: Tensor) -> Tensor:
    """Per-sample, per-channel root-mean-square ``||h_{n,c}||_2 / sqrt(H W)``: Tensor[N, C, H, W] → Tensor[N, C]."""
    return h.pow(2).mean((2, 3)).clamp_min(0).sqrt()


def feature_l21(h: Tensor) -> Tensor:
    """Instance-wise l2,1 norm of a feature map, averaged over the batch: ``mean_n sum_c ||h_{n,c}||_2 / sqrt(HW)``.

    Its gradient drives whole channels of each instance to zero (group sparsity per instance).
    """
    return channel_norms(h).sum(1).mean()


def instance_keep_mask(norms: Tensor, ratio: float | Tensor) -> Tensor:
    """The dynamic threshold of inference: keep channel ``c`` of sample ``n`` when
    ``norm_{n,c} > ratio · mean_c norm_{n,c}`` (channels with norm 0 are always dropped).

    Args:
        norms: Tensor[N, C] channel norms (:func:`channel_norms`).
        ratio: threshold relative to the sample's mean channel norm (0 keeps every non-zero channel).

    Returns:
        Tensor[N, C] bool.
    """
    mean = norms.mean(1, keepdim=True)
    return (norms > ratio * mean) & (norms > 0)
