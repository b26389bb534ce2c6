"""The floor of :mod:`dynnet.kernels.channel`: convolution geometry and batch-norm folding (pure PyTorch).

Every other module of the package builds on these; this one imports nothing of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvSpec", "conv_out_size", "fold_bn", "pair_out_hw"]


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of a 2-D convolution with ``groups == 1`` (taken from an ``nn.Conv2d``)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvSpec:
        """The geometry of ``conv``, which must be dense (``groups == 1``) with numeric padding."""
        if conv.groups != 1 or not isinstance(conv.padding, tuple):
            raise ValueError(f"channel slicing needs a dense convolution with numeric padding, got {conv}")
        return cls(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))  # type: ignore[arg-type]

    def conv(self, x: Tensor, w: Tensor, b: Tensor | None = None, groups: int = 1) -> Tensor:
        """``conv2d(x; w, b)`` with this geometry: x Tensor[N, C_in, H, W], w Tensor[C_out, C_in / groups, k, k]."""
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)


def fold_bn(conv: nn.Conv2d | nn.Linear, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode batch norm into the preceding convolution (or linear layer: a BatchNorm1d after it).

    Returns:
        ``(weight, bias)``: the layer's weight shape (Tensor[C_out, C_in, kh, kw] or Tensor[C_out, C_in]) and
        Tensor[C_out] with ``bn(layer(x)) == layer(x; weight, bias)``.
    """
    if bn.training or bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn needs a batch norm in eval mode with running statistics")
    inv = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(inv)
    w = conv.weight * (gamma * inv).view(-1, *([1] * (conv.weight.dim() - 1)))
    b = beta - bn.running_mean * gamma * inv
    if conv.bias is not None:
        b = b + conv.bias * gamma * inv
    return w, b


def pair_out_hw(spec1: ConvSpec, spec2: ConvSpec, x: Tensor, w1: Tensor, w2: Tensor) -> tuple[int, int]:
    """``(H', W')`` after two convolutions (weights w1, w2 Tensor[·, ·, kh, kw]) of x Tensor[N, C, H, W]."""
    size = []
    for d in range(2):
        s = x.shape[2 + d]
        for spec, w in ((spec1, w1), (spec2, w2)):
            k = w.shape[2 + d]
            s = (s + 2 * spec.padding[d] - spec.dilation[d] * (k - 1) - 1) // spec.stride[d] + 1
        size.append(s)
    return size[0], size[1]


def conv_out_size(size: int, kernel: int, spec: ConvSpec, d: int) -> int:
    """The output length along axis ``d`` (0: height, 1: width) of a convolution over ``size`` inputs."""
    return (size + 2 * spec.padding[d] - spec.dilation[d] * (kernel - 1) - 1) // spec.stride[d] + 1
