"""Residual-block adapters: how to split a block of a known class into body, shortcut and post-op.

A residual block computes ``post(shortcut(x) + body(x))``. Skipping the block per input keeps
``post(shortcut(x))``. Adapters exist for torchvision ResNet (BasicBlock, Bottleneck), MobileNetV2
(InvertedResidual with a residual connection), timm ResNet blocks and dynnet's own CIFAR ResNet;
users register theirs with :func:`register_residual_adapter`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from dynnet.core.registry import TypeRegistry

__all__ = ["ResidualAdapter", "find_adapter", "register_residual_adapter"]


def _always(block: nn.Module) -> bool:
    return True


@dataclass(frozen=True)
class ResidualAdapter:
    """Functions of the *original* block object.

    Attributes:
        body: ``body(block, x)`` — the residual branch, Tensor[N, C_in, H, W] → Tensor[N, C_out, H', W'].
        shortcut: ``shortcut(block, x)`` — identity or projection.
        post: ``post(block, y)`` — what follows the addition (ReLU for ResNets, identity for MobileNetV2).
        in_channels: ``in_channels(block)``.
        applies: ``applies(block)`` — whether this instance really is residual (MobileNetV2 blocks
            without a residual connection are not).
    """

    body: Callable[[nn.Module, Tensor], Tensor]
    shortcut: Callable[[nn.Module, Tensor], Tensor]
    post: Callable[[nn.Module, Tensor], Tensor]
    in_channels: Callable[[nn.Module], int]
    applies: Callable[[nn.Module], bool] = _always


def register_residual_adapter(cls: type, adapter: ResidualAdapter) -> None:
    """Teach the converters a residual block class (and its subclasses that keep its ``forward``); raises if the
    class already has one."""
    _ADAPTERS.register(cls, adapter)


def find_adapter(block: nn.Module) -> ResidualAdapter | None:
    """The adapter of ``block``'s class (or of the nearest registered class it inherits ``forward`` from), if it
    applies to this instance."""
    adapter = _ADAPTERS.lookup(block)
    return adapter if adapter is not None and adapter.applies(block) else None


def _identity(block: nn.Module, x: Tensor) -> Tensor:
    return x


def _downsample(block: nn.Module, x: Tensor) -> Tensor:
    return x if block.downsample is None else block.downsample(x)


def _relu(block: nn.Module, y: Tensor) -> Tensor:
    return block.relu(y)


def identity_shortcut(adapter: ResidualAdapter, block: nn.Module) -> bool:
    """Whether a built-in adapter's shortcut is the identity for this block (no ``downsample``)."""
    return adapter.shortcut is _downsample and getattr(block, "downsample", 0) is None


def projection_shortcut(adapter: ResidualAdapter, block: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
    """The ``(conv, bn)`` of a built-in adapter's projection shortcut when it is exactly ``bn(conv1x1(x))``
    (``downsample = Sequential(Conv2d 1×1, BatchNorm2d)``, no padding, groups or dilation), so that fused kernels may
    compute it themselves; ``None`` otherwise (identity shortcuts included)."""
    if adapter.shortcut is not _downsample:
        return None
    ds = getattr(block, "downsample", None)
    if type(ds) is not nn.Sequential or len(ds) != 2:
        return None
    conv, bn = ds[0], ds[1]
    if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d:
        return None
    if conv.kernel_size != (1, 1) or conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1:
        return None
    return conv, bn


def post_is_relu(adapter: ResidualAdapter, block: nn.Module) -> bool:
    """Whether ``adapter.post`` is exactly a ReLU for this block (a built-in ResNet adapter whose block's ``relu``
    is an ``nn.ReLU``): fused kernels may then apply it themselves."""
    return adapter.post is _relu and type(getattr(block, "relu", None)) is nn.ReLU


def _conv1_in(block: nn.Module) -> int:
    return block.conv1.in_channels


# The adapters' functions live at module level (no closures, no lambdas): a converted model holds its adapters, and
# pickle, copy.deepcopy and torch.save store a function by its qualified name.
def _basic_body(b: nn.Module, x: Tensor) -> Tensor:
    return b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x)))))


def _bottleneck_body(b: nn.Module, x: Tensor) -> Tensor:
    out = b.relu(b.bn1(b.conv1(x)))
    out = b.relu(b.bn2(b.conv2(out)))
    return b.bn3(b.conv3(out))


def _inverted_body(b: nn.Module, x: Tensor) -> Tensor:
    return b.conv(x)


def _inverted_in_channels(b: nn.Module) -> int:
    return b.conv[0][0].in_channels


def _inverted_applies(b: nn.Module) -> bool:
    return bool(b.use_res_connect)


def _timm_tail(b: nn.Module, x: Tensor) -> Tensor:
    if b.se is not None:
        x = b.se(x)
    if b.drop_path is not None:
        x = b.drop_path(x)
    return x


def _timm_basic_body(b: nn.Module, x: Tensor) -> Tensor:
    x = b.aa(b.act1(b.drop_block(b.bn1(b.conv1(x)))))
    return _timm_tail(b, b.bn2(b.conv2(x)))


def _timm_bottleneck_body(b: nn.Module, x: Tensor) -> Tensor:
    x = b.act1(b.bn1(b.conv1(x)))
    x = b.aa(b.act2(b.drop_block(b.bn2(b.conv2(x)))))
    return _timm_tail(b, b.bn3(b.conv3(x)))


def _timm_post2(b: nn.Module, y: Tensor) -> Tensor:
    return b.act2(y)


def _timm_post3(b: nn.Module, y: Tensor) -> Tensor:
    return b.act3(y)


def _register_builtin() -> None:
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock as TvBasic
    from torchvision.models.resnet import Bottleneck as TvBottleneck

    from dynnet.models.cifar_resnet import BasicBlock as CifarBasic

    register_residual_adapter(CifarBasic, ResidualAdapter(_basic_body, _downsample, _relu, _conv1_in))
    register_residual_adapter(TvBasic, ResidualAdapter(_basic_body, _downsample, _relu, _conv1_in))
    register_residual_adapter(TvBottleneck, ResidualAdapter(_bottleneck_body, _downsample, _relu, _conv1_in))
    register_residual_adapter(
        InvertedResidual,
        ResidualAdapter(
            body=_inverted_body,
            shortcut=_identity,
            post=_identity,
            in_channels=_inverted_in_channels,
            applies=_inverted_applies,
        ),
    )
    try:
        from timm.models.resnet import BasicBlock as TimmBasic
        from timm.models.resnet import Bottleneck as TimmBottleneck
    except ImportError:  # timm is optional
        return
    register_residual_adapter(TimmBasic, ResidualAdapter(_timm_basic_body, _downsample, _timm_post2, _conv1_in))
    register_residual_adapter(
        TimmBottleneck, ResidualAdapter(_timm_bottleneck_body, _downsample, _timm_post3, _conv1_in)
    )


# Built-ins registered on first use (importing torchvision and timm costs seconds).
_ADAPTERS: TypeRegistry[ResidualAdapter] = TypeRegistry("residual adapter", same_forward=True, loader=_register_builtin)
