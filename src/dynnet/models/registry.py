"""The model registry: ``cifar_resnet{8,14,20,26,32,44,56,110}``, torchvision models, ``timm/<name>``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from dynnet.core.registry import Registry, UnknownNameError
from dynnet.models.cifar_resnet import CifarResNet

__all__ = ["MODELS", "build_base_model", "check_model_name"]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

for _depth in (8, 14, 20, 26, 32, 44, 56, 110):
    MODELS.register(f"cifar_resnet{_depth}", functools.partial(CifarResNet, _depth))


def _torchvision(name: str, *, num_classes: int = 1000, in_channels: int = 3, weights: str | None = None, **kw: Any):
    import torchvision

    if in_channels != 3:
        raise ValueError(
            f"torchvision's {name} takes 3 input channels, got {in_channels}: repeat grey images to 3 channels "
            "(dynnet train --grey-to-rgb; build_loaders(..., channels=3) in Python)"
        )
    try:
        return torchvision.models.get_model(name, weights=weights, num_classes=num_classes, **kw)
    except ValueError as err:
        raise UnknownNameError(f"unknown model {name!r}: not a dynnet model and torchvision says: {err}") from None


def _timm(name: str, *, num_classes: int = 1000, in_channels: int = 3, pretrained: bool = False, **kw: Any):
    try:
        import timm
    except ImportError as err:
        raise ImportError("timm models need `pip install timm` (or `pip install dynnet[zoo]`)") from err
    if not timm.is_model(name):
        raise UnknownNameError(f"unknown timm model {name!r}")
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **kw)


def check_model_name(name: str) -> None:
    """Raise unless ``name`` names a model: a registered dynnet model, a torchvision model or ``timm/<name>`` (timm
    names are checked when built). Cheap: nothing is built.

    Raises:
        TypeError: ``name`` is not a string.
        UnknownNameError: no such model (the message lists the dynnet models).
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}: {name!r}")
    if name in MODELS or (name.startswith("timm/") and name != "timm/"):
        return
    import torchvision

    if name not in torchvision.models.list_models():
        known = ", ".join(MODELS.names())
        raise UnknownNameError(
            f"unknown model {name!r}; dynnet models: {known}; or a torchvision name, or 'timm/<name>'"
        )


def build_base_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a static base network by name.

    Names: registered dynnet models (``cifar_resnet20``...), ``timm/<name>`` for timm, otherwise a
    torchvision model name (``resnet18``, ``mobilenet_v2``...). Weights are never downloaded unless the
    caller asks (``weights=...`` for torchvision, ``pretrained=True`` for timm).
    """
    # The name first: "unknown model" is the answer to a typo, whatever the data's channels.
    check_model_name(name)
    if name in MODELS:
        return MODELS.get(name)(**kwargs)
    if name.startswith("timm/"):
        return _timm(name.removeprefix("timm/"), **kwargs)
    try:
        return _torchvision(name, **kwargs)
    except UnknownNameError:
        known = ", ".join(MODELS.names())
        raise UnknownNameError(
            f"unknown model {name!r}; dynnet models: {known}; or a torchvision name, or 'timm/<name>'"
        ) from None
