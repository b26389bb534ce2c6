"""Residual-block adapters: how to split a block of a known class into body, shortcut and post-op.

A residual block computes ``post(shortcut(x) + body(x))``. Skipping the block per input keeps
``post(shortcut(x))``. Adapters exist for torchvision ResNet / ResNeXt / Wide ResNet (BasicBlock, Bottleneck),
MobileNetV2 and MobileNetV3 (InvertedResidual), EfficientNet (MBConv) and EfficientNetV2 (FusedMBConv), RegNet
(ResBottleneckBlock), ConvNeXt (CNBlock: ``x + stochastic_depth(layer_scale * block(x))``), timm ResNet blocks, timm
EfficientNet / MobileNetV3 blocks (DepthwiseSeparableConv, InvertedResidual, EdgeResidual) and dynnet's own CIFAR
ResNet; a block whose instance has no skip connection (a stride-2 or channel-changing inverted residual) is not
residual (``applies``). Stochastic depth stays part of the body (the identity in eval). Users register theirs with
:func:`register_residual_adapter`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from dynnet.core.registry import TypeRegistry

__all__ = ["ResidualAdapter", "find_adapter", "plain_timm_branch", "register_residual_adapter"]


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
    — timm's ``act2`` / ``act3`` — is an ``nn.ReLU``): fused kernels may then apply it themselves."""
    act = {_relu: "relu", _timm_post2: "act2", _timm_post3: "act3"}.get(adapter.post)  # type: ignore[call-overload]
    return act is not None and type(getattr(block, act, None)) is nn.ReLU


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


def _first_conv_in(b: nn.Module) -> int:
    return next(m for m in b.modules() if isinstance(m, nn.Conv2d)).in_channels


def _block_body(b: nn.Module, x: Tensor) -> Tensor:
    return b.block(x)


def _uses_res_connect(b: nn.Module) -> bool:
    return bool(b.use_res_connect)


def _mbconv_body(b: nn.Module, x: Tensor) -> Tensor:
    return b.stochastic_depth(b.block(x))


def _regnet_body(b: nn.Module, x: Tensor) -> Tensor:
    return b.f(x)


def _regnet_shortcut(b: nn.Module, x: Tensor) -> Tensor:
    return x if b.proj is None else b.proj(x)


def _regnet_post(b: nn.Module, y: Tensor) -> Tensor:
    return b.activation(y)


def _convnext_body(b: nn.Module, x: Tensor) -> Tensor:
    return b.stochastic_depth(b.layer_scale * b.block(x))


def _timm_has_skip(b: nn.Module) -> bool:
    return bool(b.has_skip)


def _timm_s2d(b: nn.Module, x: Tensor) -> Tensor:
    return x if getattr(b, "conv_s2d", None) is None else b.bn_s2d(b.conv_s2d(x))


def _timm_ds_body(b: nn.Module, x: Tensor) -> Tensor:
    x = b.se(b.aa(b.bn1(b.conv_dw(_timm_s2d(b, x)))))
    return b.drop_path(b.bn2(b.conv_pw(x)))


def _timm_ir_body(b: nn.Module, x: Tensor) -> Tensor:
    x = b.bn1(b.conv_pw(_timm_s2d(b, x)))
    x = b.se(b.aa(b.bn2(b.conv_dw(x))))
    return b.drop_path(b.bn3(b.conv_pwl(x)))


def _timm_edge_body(b: nn.Module, x: Tensor) -> Tensor:
    x = b.se(b.aa(b.bn1(b.conv_exp(x))))
    return b.drop_path(b.bn2(b.conv_pwl(x)))


def _timm_tail(b: nn.Module, x: Tensor) -> Tensor:
    if b.se is not None:
        x = b.se(x)
    if b.drop_path is not None:
        x = b.drop_path(x)
    return x


def plain_timm_branch(b: nn.Module) -> bool:
    """Whether a timm ResNet block's branch is the plain conv chain of torchvision's: no squeeze-excitation,
    anti-aliasing, DropBlock or stochastic depth (timm's defaults: absent or the identity)."""
    extras = (getattr(b, "drop_block", None), getattr(b, "aa", None), getattr(b, "drop_path", None))
    return getattr(b, "se", None) is None and all(m is None or isinstance(m, nn.Identity) for m in extras)


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
    from torchvision.models.convnext import CNBlock
    from torchvision.models.efficientnet import FusedMBConv, MBConv
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.mobilenetv3 import InvertedResidual as InvertedResidualV3
    from torchvision.models.regnet import ResBottleneckBlock
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
    register_residual_adapter(
        InvertedResidualV3, ResidualAdapter(_block_body, _identity, _identity, _first_conv_in, _uses_res_connect)
    )
    for cls in (MBConv, FusedMBConv):
        register_residual_adapter(
            cls, ResidualAdapter(_mbconv_body, _identity, _identity, _first_conv_in, _uses_res_connect)
        )
    register_residual_adapter(
        ResBottleneckBlock, ResidualAdapter(_regnet_body, _regnet_shortcut, _regnet_post, _first_conv_in)
    )
    register_residual_adapter(CNBlock, ResidualAdapter(_convnext_body, _identity, _identity, _first_conv_in))
    try:
        from timm.models._efficientnet_blocks import DepthwiseSeparableConv, EdgeResidual
        from timm.models._efficientnet_blocks import InvertedResidual as TimmInverted
        from timm.models.resnet import BasicBlock as TimmBasic
        from timm.models.resnet import Bottleneck as TimmBottleneck
    except ImportError:  # timm is optional
        return
    register_residual_adapter(TimmBasic, ResidualAdapter(_timm_basic_body, _downsample, _timm_post2, _conv1_in))
    register_residual_adapter(
        TimmBottleneck, ResidualAdapter(_timm_bottleneck_body, _downsample, _timm_post3, _conv1_in)
    )
    for cls, body in (
        (DepthwiseSeparableConv, _timm_ds_body),
        (TimmInverted, _timm_ir_body),
        (EdgeResidual, _timm_edge_body),
    ):
        register_residual_adapter(cls, ResidualAdapter(body, _identity, _identity, _first_conv_in, _timm_has_skip))


# Built-ins registered on first use (importing torchvision and timm costs seconds).
_ADAPTERS: TypeRegistry[ResidualAdapter] = TypeRegistry("residual adapter", same_forward=True, loader=_register_builtin)
