"""Spatial gates: map a feature map to a map of "compute here" logits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynnet.gates.pooled import OPEN_LOGIT

__all__ = ["PixelGateUnit", "SqueezeMaskUnit"]


class SqueezeMaskUnit(nn.Module):
    """DynConv's squeeze mask unit (also SACT's halting unit): a local and a global term.

    ``logits = conv3x3_stride(x) + fc(avgpool(x))``: Tensor[N, C, H, W] → Tensor[N, H', W'] with
    ``H' = (H - 1) // stride + 1``.

    Args:
        in_channels: C.
        stride: the stride of the block whose output positions the logits choose.
        open_logit: initial logit everywhere (weights start tiny), ``OPEN_LOGIT`` for a mask that starts on;
            a negative value makes a unit that starts off (halting units).
    """

    def __init__(self, in_channels: int, stride: int = 1, *, open_logit: float = OPEN_LOGIT) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, 3, stride, 1, bias=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, 1, bias=True)
        with torch.no_grad():
            nn.init.normal_(self.conv.weight, std=1e-3)
            nn.init.normal_(self.fc.weight, std=1e-3)
            self.conv.bias.fill_(open_logit)
            self.fc.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        local = self.conv(x).squeeze(1)
        glob = self.fc(self.pool(x).flatten(1))
        return local + glob.view(-1, 1, 1)


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
            nn.init.normal_(self.conv2.weight, std=1e-3)
            self.conv2.bias.zero_()
            self.conv2.bias[open_index] = OPEN_LOGIT

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.act(self.bn(self.conv1(x)))).permute(0, 2, 3, 1)
