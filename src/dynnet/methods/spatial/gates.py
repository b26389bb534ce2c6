"""Spatial gates: map a feature map to a map of "compute here" logits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynnet.core import tracing_or_compiling
from dynnet.gates.pooled import OPEN_LOGIT
from dynnet.kernels import native

__all__ = ["PixelGateUnit", "SqueezeMaskUnit"]


class SqueezeMaskUnit(nn.Module):
    """DynConv's squeeze mask unit (also SACT's halting unit): a local and a global term.

    ``logits = conv3x3_stride(x) + fc(avgpool(x))``: Tensor[N, C, H, W] → Tensor[N, H', W'] with
    ``H' = (H - 1) // stride + 1``.

    Args:
        in_channels: C.
        stride: the stride of the block whose output positions the logits choose.
        open_logit: initial logit everywhere (weights start at zero), ``OPEN_LOGIT`` for a mask that starts on;
            a negative value makes a unit that starts off (halting units).
    """

    def __init__(self, in_channels: int, stride: int = 1, *, open_logit: float = OPEN_LOGIT) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, 3, stride, 1, bias=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, 1, bias=True)
        with torch.no_grad():
            # Zero weights: only the bias speaks, whatever the scale of a trained network's features.
            self.conv.weight.zero_()
            self.fc.weight.zero_()
            self.conv.bias.fill_(open_logit)
            self.fc.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        compiled = self._compiled(x)
        if compiled is not None:
            return compiled
        local = self.conv(x).squeeze(1)
        glob = self.fc(self.pool(x).flatten(1))
        return local + glob.view(-1, 1, 1)

    def _compiled(self, x: Tensor) -> Tensor | None:
        """The unit as one compiled pass (``squeeze_logits``) at inference: no gradients, tracing or observer
        (a MAC counter, the profiler: they see the layers above, with the same MACs), float32 CPU, no hooks on
        the layers it stands for; else ``None``. A one-output-channel convolution, a pooling, a linear layer and an
        addition cost 50–120 µs per sample at 8–32 channels (64–16 px) in PyTorch, a large part of a narrow
        network's sparse mode."""
        if torch.is_grad_enabled() or tracing_or_compiling() or native.observed() or native.disabled():
            return None
        conv, fc = self.conv, self.fc
        if (
            type(x) is not Tensor
            or x.dtype != torch.float32
            or not x.is_cpu
            or conv.weight.dtype != torch.float32
            or conv.dilation != (1, 1)
            or isinstance(conv.padding, str)
            or len({conv.padding[0], conv.padding[1]}) != 1
            or len({conv.stride[0], conv.stride[1]}) != 1
            or conv.padding_mode != "zeros"
            or any(m._forward_hooks or m._forward_pre_hooks for m in (conv, fc, self.pool))
        ):
            return None
        ext = native.load(warn=False)
        if ext is None:
            return None
        return ext.squeeze_logits(x, conv.weight, conv.bias, conv.stride[0], conv.padding[0], fc.weight, fc.bias)


class PixelGateUnit(nn.Module):
    """Pixel-wise attentional gate (Kong & Fowlkes): 3×3 conv → BN → ReLU → 1×1 conv to ``choices`` logits.

    Tensor[N, C, H, W] → Tensor[N, H', W', choices] (the last dim holds the categorical logits, so
    :func:`dynnet.estimators.gumbel_softmax` applies directly), ``H' = (H - 1) // stride + 1``.

    Args:
        in_channels: C.
        stride: stride of the block whose output positions the gate chooses for.
        hidden: width of the hidden layer.
        choices: number of options per pixel (2: off/on).
        open_index: the option that starts chosen everywhere (bias trick).
    """

    def __init__(self, in_channels: int, stride: int = 1, hidden: int = 16, choices: int = 2, open_index: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, choices, 1, bias=True)
        with torch.no_grad():
            self.conv2.weight.zero_()  # only the bias speaks, whatever the scale of the features
            self.conv2.bias.zero_()
            self.conv2.bias[open_index] = OPEN_LOGIT

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.act(self.bn(self.conv1(x)))).permute(0, 2, 3, 1)
