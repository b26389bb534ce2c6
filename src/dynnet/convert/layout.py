"""Network layouts: how to run a network piece by piece, ``stem → stages of blocks → head``.

Recipes with control flow around the blocks (SkipNet's recurrent gate, BlockDrop's policy, Dual Dynamic Inference's
exits, the early-exit cascades) run the network themselves. :func:`network_layout` says how, for a registered class
(looked up along the MRO, the one rule of :class:`~dynnet.core.registry.TypeRegistry`): torchvision ResNet / ResNeXt
/ Wide ResNet, MobileNetV2, MobileNetV3, EfficientNet (V1 and V2), RegNet, ConvNeXt, timm ResNet, EfficientNet and
MobileNetV3, and dynnet's CIFAR ResNets. Users register theirs with :func:`register_layout`.

A layout holds only module-level functions and names (no closures), so a converted model that keeps one pickles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynnet.core.registry import TypeRegistry

__all__ = ["NetworkLayout", "network_layout", "register_layout"]


@dataclass(frozen=True)
class NetworkLayout:
    """``net(x) == head(net, run_blocks(stem(net, x)))`` with the blocks run in order, stage after stage.

    Attributes:
        stem: ``stem(net, x)``: Tensor[N, C, H, W] → the first block's input.
        stages: per stage, ``(name, block names)``: the dotted names (in ``net``) of its blocks, in execution order.
        head: ``head(net, h)``: the last block's output → logits Tensor[N, K].
    """

    stem: Callable[[nn.Module, Tensor], Tensor]
    stages: tuple[tuple[str, tuple[str, ...]], ...]
    head: Callable[[nn.Module, Tensor], Tensor]

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The name of every stage, in order."""
        return tuple(name for name, _ in self.stages)

    def blocks(self, net: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """``(dotted name, block)`` of every block of every stage, in execution order."""
        for _, names in self.stages:
            for name in names:
                yield name, net.get_submodule(name)

    def stage_blocks(self, net: nn.Module, k: int) -> list[nn.Module]:
        """The blocks of stage ``k``, in order."""
        return [net.get_submodule(name) for name in self.stages[k][1]]


def register_layout(cls: type, fn: Callable[[nn.Module], NetworkLayout]) -> None:
    """Teach the converters how to run a network class (and its subclasses) piece by piece; raises on a duplicate."""
    _LAYOUTS.register(cls, fn)


def network_layout(net: nn.Module, *, needed_by: str | None = None) -> NetworkLayout:
    """The :class:`NetworkLayout` of ``net``.

    Args:
        net: a network of a registered class.
        needed_by: who asks (a recipe name), for the error message.

    Raises:
        ValueError: ``net``'s class is unknown (one line naming what is supported).
    """
    fn = _LAYOUTS.lookup(net)
    if fn is not None:
        return fn(net)
    who = f"{needed_by} runs" if needed_by else "this recipe runs"
    raise ValueError(
        f"{who} a network as stem → blocks → head and does not know {type(net).__name__}; known: "
        f"{', '.join(_LAYOUTS.names())}; register one with dynnet.convert.register_layout"
    )


def _sequential_stages(net: nn.Module, names: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """One stage per named ``nn.Sequential`` of blocks."""
    return tuple((s, tuple(f"{s}.{c}" for c, _ in net.get_submodule(s).named_children())) for s in names)


def _split_at_transitions(net: nn.Module, names: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Blocks grouped into stages, a new stage at every block without a skip connection (stride or width change).

    A block already wrapped by a conversion is judged by the block it wraps (``_block``, see
    :func:`dynnet.blocks.residual.adopt_children`), so that the layout of a converted network is the base's.
    """
    from dynnet.convert.residual import find_adapter

    stages: list[tuple[str, list[str]]] = []
    for name in names:
        block = net.get_submodule(name)
        if not stages or find_adapter(getattr(block, "_block", block)) is None:
            stages.append((name, []))
        stages[-1][1].append(name)
    return tuple((s, tuple(b)) for s, b in stages)


# -- ResNets ------------------------------------------------------------------------------------------------------
def _resnet_stage_names(net: nn.Module) -> list[str]:
    names, k = [], 1
    while isinstance(getattr(net, f"layer{k}", None), nn.Sequential):
        names.append(f"layer{k}")
        k += 1
    return names


def _resnet_stem(net: nn.Module, x: Tensor) -> Tensor:
    act = getattr(net, "relu", None) or net.act1
    x = act(net.bn1(net.conv1(x)))
    maxpool = getattr(net, "maxpool", None)
    return maxpool(x) if isinstance(maxpool, nn.Module) else x


def _resnet_head(net: nn.Module, h: Tensor) -> Tensor:
    return net.fc(torch.flatten(net.avgpool(h), 1))


def _timm_resnet_head(net: nn.Module, h: Tensor) -> Tensor:
    return net.forward_head(h)


def _resnet(net: nn.Module) -> NetworkLayout:
    return NetworkLayout(_resnet_stem, _sequential_stages(net, _resnet_stage_names(net)), _resnet_head)


def _timm_resnet(net: nn.Module) -> NetworkLayout:
    return NetworkLayout(_resnet_stem, _sequential_stages(net, _resnet_stage_names(net)), _timm_resnet_head)


# -- torchvision features / classifier networks --------------------------------------------------------------------
def _features_stem(net: nn.Module, x: Tensor) -> Tensor:
    return net.features[0](x)


def _features_tail_head(net: nn.Module, h: Tensor) -> Tensor:
    """MobileNetV2 / V3, EfficientNet: the last feature layer (a 1×1 conv), pooling, classifier."""
    h = net.features[-1](h)
    pool = getattr(net, "avgpool", None)
    h = nn.functional.adaptive_avg_pool2d(h, 1) if pool is None else pool(h)
    return net.classifier(torch.flatten(h, 1))


def _pool_classifier_head(net: nn.Module, h: Tensor) -> Tensor:
    """ConvNeXt: pooling, then a classifier that flattens itself."""
    return net.classifier(net.avgpool(h))


def _mobilenet(net: nn.Module) -> NetworkLayout:
    names = [f"features.{i}" for i in range(1, len(net.features) - 1)]
    return NetworkLayout(_features_stem, _split_at_transitions(net, names), _features_tail_head)


def _efficientnet(net: nn.Module) -> NetworkLayout:
    return NetworkLayout(
        _features_stem,
        _sequential_stages(net, [f"features.{i}" for i in range(1, len(net.features) - 1)]),
        _features_tail_head,
    )


def _convnext(net: nn.Module) -> NetworkLayout:
    # features: stem, then stages of CNBlocks with a downsampling layer (LayerNorm2d + conv) between two stages.
    stages = []
    for i in range(1, len(net.features)):
        stage = net.features[i]
        # A downsampling layer (LayerNorm2d, Conv2d) is a stage of its own (one block, never residual); judged by its
        # convolution, not by the class of the blocks, which a conversion may have wrapped.
        if any(isinstance(m, nn.Conv2d) for m in stage.children()):
            stages.append((f"features.{i}", (f"features.{i}",)))
        else:
            stages.append((f"features.{i}", tuple(f"features.{i}.{j}" for j in range(len(stage)))))
    return NetworkLayout(_features_stem, tuple(stages), _pool_classifier_head)


def _regnet_stem(net: nn.Module, x: Tensor) -> Tensor:
    return net.stem(x)


def _regnet(net: nn.Module) -> NetworkLayout:
    names = [f"trunk_output.{n}" for n, _ in net.trunk_output.named_children()]
    return NetworkLayout(_regnet_stem, _sequential_stages(net, names), _resnet_head)


# -- timm EfficientNet / MobileNetV3 -------------------------------------------------------------------------------
def _timm_effnet_stem(net: nn.Module, x: Tensor) -> Tensor:
    return net.bn1(net.conv_stem(x))


def _timm_effnet_head(net: nn.Module, h: Tensor) -> Tensor:
    return net.forward_head(net.bn2(net.conv_head(h)))


def _timm_blocks(net: nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return _sequential_stages(net, [f"blocks.{n}" for n, _ in net.blocks.named_children()])


def _timm_effnet(net: nn.Module) -> NetworkLayout:
    return NetworkLayout(_timm_effnet_stem, _timm_blocks(net), _timm_effnet_head)


def _timm_mobilenetv3(net: nn.Module) -> NetworkLayout:
    return NetworkLayout(_timm_effnet_stem, _timm_blocks(net), _timm_resnet_head)


def _register_builtin() -> None:
    from torchvision.models import ConvNeXt, EfficientNet, MobileNetV2, MobileNetV3, RegNet, ResNet

    from dynnet.models.cifar_resnet import CifarResNet

    for cls, fn in (
        (CifarResNet, _resnet),
        (ResNet, _resnet),
        (MobileNetV2, _mobilenet),
        (MobileNetV3, _mobilenet),
        (EfficientNet, _efficientnet),
        (RegNet, _regnet),
        (ConvNeXt, _convnext),
    ):
        register_layout(cls, fn)
    try:
        from timm.models.efficientnet import EfficientNet as TimmEfficientNet
        from timm.models.mobilenetv3 import MobileNetV3 as TimmMobileNetV3
        from timm.models.resnet import ResNet as TimmResNet
    except ImportError:  # timm is optional
        return
    register_layout(TimmResNet, _timm_resnet)
    register_layout(TimmEfficientNet, _timm_effnet)
    register_layout(TimmMobileNetV3, _timm_mobilenetv3)


# Built-ins registered on first use (importing torchvision and timm costs seconds).
_LAYOUTS: TypeRegistry[Callable[[nn.Module], NetworkLayout]] = TypeRegistry("network layout", loader=_register_builtin)
