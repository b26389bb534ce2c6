"""Model surgery: find target blocks and replace them in place, recursively by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from dynnet.convert.residual import ResidualAdapter, find_adapter

__all__ = ["Targets", "first_conv_in_channels", "replace_module", "residual_blocks"]

Targets = str | Sequence[str] | Callable[[str, nn.Module], bool]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``root`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def residual_blocks(model: nn.Module, targets: Targets = "auto") -> list[tuple[str, nn.Module, ResidualAdapter]]:
    """Residual blocks of ``model`` that a layer-level recipe can gate, in execution (definition) order.

    Args:
        model: any network.
        targets: ``"auto"`` (every block with a registered adapter), a list of dotted names, or a
            predicate ``(name, module) -> bool`` applied to the blocks that have an adapter.

    Raises:
        ValueError: a named target is missing or is not a known residual block, or nothing matched.
    """
    if not (isinstance(targets, str) or callable(targets) or (_is_name_list(targets))):
        raise TypeError(
            f'targets must be "auto", a list of block names or a predicate (name, module) -> bool, got {targets!r}'
        )
    found = [(n, m, a) for n, m in model.named_modules() if n and (a := find_adapter(m)) is not None]
    if isinstance(targets, str):
        if targets != "auto":
            targets = [targets]
        else:
            chosen = found
    if not isinstance(targets, str):
        if callable(targets):
            chosen = [(n, m, a) for n, m, a in found if targets(n, m)]
        else:
            by_name = {n: (n, m, a) for n, m, a in found}
            modules = dict(model.named_modules())
            for name in targets:
                if name not in modules:
                    raise ValueError(f"target {name!r} is not a submodule of {type(model).__name__}")
                if name not in by_name:
                    raise ValueError(
                        f"target {name!r} is a {type(modules[name]).__name__}, not a residual block dynnet knows; "
                        "register one with dynnet.convert.register_residual_adapter"
                    )
            chosen = [by_name[n] for n in targets]
    if not chosen:
        raise ValueError(
            f"no residual blocks found in {type(model).__name__} (this recipe acts on blocks with a skip connection; "
            "a plain network such as VGG takes early exits only); supported: torchvision ResNet/ResNeXt/Wide ResNet, "
            "MobileNetV2/V3, EfficientNet(V2), RegNet, ConvNeXt, timm ResNet/EfficientNet/MobileNetV3, dynnet CIFAR "
            "ResNets, or register an adapter with register_residual_adapter"
        )
    return chosen


def _is_name_list(targets: object) -> bool:
    return isinstance(targets, Sequence) and not isinstance(targets, bytes) and all(isinstance(t, str) for t in targets)


def first_conv_in_channels(model: nn.Module) -> int | None:
    """Input channels of the first convolution (used to validate inputs), or ``None``."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def classifier_of(model: nn.Module, *, needed_by: str | None = None) -> tuple[str, nn.Linear]:
    """``(dotted name, module)`` of ``model``'s classifier: its last ``nn.Linear`` in module order.

    Args:
        model: a classification network.
        needed_by: who asks (a recipe name), for the error message.

    Raises:
        ValueError: ``model`` has no ``nn.Linear`` (one line naming who needs one).
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        who = f"{needed_by} needs" if needed_by else "dynnet needs"
        raise ValueError(f"{who} a classifier ending in nn.Linear; {type(model).__name__} has no nn.Linear")
    return linears[-1]


def num_classes_of(model: nn.Module) -> int:
    """Output features of the classifier of ``model`` (:func:`classifier_of`): its number of classes.

    Raises:
        ValueError: ``model`` has no ``nn.Linear``.
    """
    return classifier_of(model)[1].out_features
