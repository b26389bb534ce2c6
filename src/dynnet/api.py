"""The top-level functions: create, convert, list."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import nn

from dynnet.convert import Targets
from dynnet.core import RECIPES, DynamicModel, UnknownNameError, build_config
from dynnet.core.budget import check_budget_in_range
from dynnet.core.latency import LatencyModel
from dynnet.core.trace import _check_budget
from dynnet.models import build_base_model

__all__ = ["convert", "create_model", "list_models", "list_recipes"]


def list_recipes(family: str | None = None) -> list[str]:
    """Registered recipe names, optionally of one family (``"layer_skip"``, ``"early_exit"``, ...)."""
    _load_methods()
    if family is not None:
        families = sorted({RECIPES.get(n).family for n in RECIPES.names()})
        if family not in families:
            raise UnknownNameError(f"unknown family {family!r}; known families: {', '.join(families)}")
    return [n for n in RECIPES.names() if family is None or RECIPES.get(n).family == family]


def list_models() -> list[str]:
    """Registered dynnet base models (torchvision names and ``timm/<name>`` work too)."""
    from dynnet.models import MODELS

    _load_methods()
    return MODELS.names()


def convert(
    model: nn.Module,
    recipe: str,
    *,
    budget: float | None = None,
    targets: Targets = "auto",
    inplace: bool = False,
    budget_ms: float | None = None,
    latency_model: LatencyModel | str | Path | None = None,
    **config: Any,
) -> DynamicModel:
    """Convert an existing network into a dynamic one with a recipe of the reading list.

    Args:
        model: a torchvision / timm / dynnet / own network (blocks found by registered adapters).
        recipe: registered recipe name (see :func:`list_recipes`).
        budget: target mean fraction of the dense model's MACs per image (gates and policy networks included), within
            the recipe's reachable range (``RecipeSpec.budget.reachable``); the recipe derives its own knobs from it.
        targets: ``"auto"``, a list of block names, or a predicate ``(name, module) -> bool``.
        inplace: modify ``model`` itself instead of a copy.
        budget_ms: a latency budget instead: the target mean latency per image (ms) on the machine the latency model
            was profiled on; every budget loss of the converted model then targets ``budget_ms`` as a fraction of the
            dense network's predicted latency (``budget`` still sets what the recipe derives at conversion).
        latency_model: a :class:`~dynnet.core.latency.LatencyModel` (or its JSON file) profiled on a conversion of
            the same network with :func:`dynnet.profile_latency`; required with ``budget_ms``.
        **config: recipe settings (fields of its config dataclass).

    Returns:
        A :class:`~dynnet.core.DynamicModel` whose gates start open: it reproduces ``model``'s logits.

    Raises:
        UnknownNameError: unknown recipe. ValueError: bad budget (outside the recipe's reachable range: the message
        names it) or targets. TypeError: unknown setting.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, DynamicModel):
        raise ValueError(f"the model is already converted (recipe {model.recipe!r}); convert its base network instead")
    _load_methods()
    spec = RECIPES.get(recipe)
    if budget is not None:
        _check_budget(budget)
        check_budget_in_range(recipe, float(budget), spec.budget)
        config["budget"] = budget
    if budget_ms is not None and latency_model is None:
        raise ValueError(
            "budget_ms needs latency_model=: profile a conversion of this network on the serving machine first, "
            "lm = dynnet.profile_latency(dynnet.convert(model, recipe), input_shape), then convert with "
            "budget_ms=..., latency_model=lm"
        )
    cfg = build_config(spec, **config)
    converted = spec.convert(model if inplace else copy.deepcopy(model), cfg, targets)
    if latency_model is not None:
        lm = latency_model if isinstance(latency_model, LatencyModel) else LatencyModel.load(latency_model)
        converted.set_latency_model_(lm, budget_ms)
    return converted


def create_model(name: str, recipe: str | None = None, *, budget: float | None = None, **kwargs: Any) -> nn.Module:
    """Build a base network by name and, with ``recipe``, convert it.

    Keyword arguments that are fields of the recipe's config go to the recipe; the rest go to the
    model builder (``num_classes``, ``in_channels``, ``width``, torchvision ``weights``, timm ``pretrained``).

    For dynnet's own models, ``pretrained=True`` (or a dataset name, default ``"fashion_mnist"``) loads the
    weights shipped in the package (:mod:`dynnet.zoo`, hash checked) before converting; ``in_channels`` and
    ``num_classes`` then default to the manifest's.

    Example:
        >>> model = dynnet.create_model("cifar_resnet20", recipe="convnet_aig", budget=0.5, in_channels=1)
        >>> model = dynnet.create_model("cifar_resnet20", recipe="convnet_aig", budget=0.5, pretrained=True)
    """
    from dynnet.models import MODELS

    _load_methods()  # method packages register their own base models (e.g. msdnet_tiny)
    pretrained = kwargs.pop("pretrained", False) if isinstance(name, str) and name in MODELS else False
    if pretrained:
        return _create_pretrained(name, recipe, "fashion_mnist" if pretrained is True else str(pretrained), budget,
                                  kwargs)  # fmt: skip
    if recipe is None:
        if budget is not None:
            raise ValueError("budget needs a recipe")
        return _remember_build(build_base_model(name, **kwargs), name, dict(kwargs))
    spec = RECIPES.get(recipe)
    fields = set(spec.config_cls.__dataclass_fields__)
    recipe_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    targets = kwargs.pop("targets", "auto")
    build_kw = dict(kwargs)  # model arguments; the recipe and its config are saved from the model itself
    try:
        base = build_base_model(name, **kwargs)
    except TypeError as err:
        raise TypeError(
            f"{err}; recipe {recipe!r} has no setting by that name either (its settings: {sorted(fields)})"
        ) from None
    model = convert(base, recipe, budget=budget, targets=targets, inplace=True, **recipe_kw)
    return _remember_build(model, name, build_kw)


def _create_pretrained(
    name: str, recipe: str | None, data: str, budget: float | None, kwargs: dict[str, Any]
) -> nn.Module:
    """:func:`create_model` with the shipped weights of ``name`` trained on ``data``."""
    from dynnet.zoo import entry, load_pretrained, weights_key

    key = weights_key(name, data, kwargs.get("width"))
    manifest, _ = entry(key)
    build_kw = dict(manifest["model_kwargs"])
    clash = {k: v for k, v in kwargs.items() if k in ("in_channels", "num_classes", "width") and build_kw.get(k) != v}
    if clash.get("width", 1.0) == 1.0 and "width" not in build_kw:
        clash.pop("width", None)
    if clash:
        raise ValueError(f"shipped weights {key!r} were trained with {build_kw}; got {clash}")
    base = build_base_model(name, **build_kw)
    load_pretrained(base, name, data=data, width=kwargs.get("width"))
    rest = {k: v for k, v in kwargs.items() if k not in ("in_channels", "num_classes", "width")}
    if recipe is None:
        if budget is not None or rest:
            raise ValueError("budget and recipe settings need a recipe")
        return _remember_build(base, name, build_kw)
    model = convert(base, recipe, budget=budget, inplace=True, **rest)
    return _remember_build(model, name, build_kw)


def _remember_build(model: nn.Module, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Record how the base network was built (``build_base_model(name, **kwargs)``) so that a checkpoint's JSON
    can rebuild the model (see ``dynnet.train.load_checkpoint``); skipped when the arguments are not JSON-able."""
    try:
        json.dumps(kwargs)
    except TypeError:
        return model
    object.__setattr__(model, "_dynnet_build", {"name": name, "kwargs": kwargs})
    return model


def _load_methods() -> None:
    import dynnet.methods  # noqa: F401  (registers every recipe)
