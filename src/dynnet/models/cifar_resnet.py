"""CIFAR-style ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2).

Three stages of ``n`` basic blocks with 16·w, 32·w, 64·w channels; depth = 6n + 2. Downsampling
blocks use a 1×1 projection shortcut (option B) so every block is a standard residual block that
dynnet's converters recognise.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet"]


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus shortcut, then ReLU: Tensor[N, C_in, H, W] → Tensor[N, C_out, H/s, W/s]."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """A CIFAR-style ResNet: Tensor[N, C, H, W] → logits Tensor[N, num_classes].

    Args:
        depth: 6n + 2 (8, 20, 32, 56, 110, ...).
        num_classes: output classes.
        in_channels: input channels (1 for Fashion-MNIST, 3 for CIFAR).
        width: channel multiplier of the 16/32/64 stages.
    """

    def __init__(self, depth: int = 20, *, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 20, 32, 56, 110), got {depth}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        n = (depth - 2) // 6
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.depth, self.width = depth, width
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, c_in = [], widths[0]
        for i, c in enumerate(widths):
            blocks = [BasicBlock(c_in if j == 0 else c, c, stride=2 if (i > 0 and j == 0) else 1) for j in range(n)]
            layers.append(nn.Sequential(*blocks))
            c_in = c
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: Tensor) -> Tensor:
        """Tensor[N, C, H, W] → pooled features Tensor[N, 64·w]."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.avgpool(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def cifar_resnet(depth: int, **kwargs: object) -> CifarResNet:
    """Build a CIFAR ResNet of the given depth (see :class:`CifarResNet`)."""
    return CifarResNet(depth, **kwargs)  # type: ignore[arg-type]
