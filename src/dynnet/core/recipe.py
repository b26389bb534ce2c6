"""The recipe registry: each method of the reading list is a registered :class:`RecipeSpec`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from dynnet.core.registry import Registry

__all__ = ["RECIPES", "RecipeSpec", "build_config", "register_recipe"]


@dataclass(frozen=True)
class RecipeSpec:
    """How to build one recipe.

    Attributes:
        name: lowercase paper name (``"convnet_aig"``).
        family: the reading-list family (``"layer_skip"``, ``"early_exit"``, ...).
        config_cls: frozen dataclass of the recipe's settings (``budget`` among them).
        convert: ``convert(model, config, targets) -> DynamicModel``.
        paper: "Title (Venue Year), link".
        test_base: a small registered base model the conformance suite converts.
        test_input: (C, H, W) of the conformance suite's inputs.
        exact_executed: sparse mode executes exactly the theoretical MACs (no gather/halo overheads).
        reproduces_base: open gates reproduce the base network's logits.
    """

    name: str
    family: str
    config_cls: type
    convert: Callable[..., nn.Module]
    paper: str
    test_base: str = "cifar_resnet8"
    test_input: tuple[int, int, int] = (3, 32, 32)
    exact_executed: bool = True
    reproduces_base: bool = True


RECIPES: Registry[RecipeSpec] = Registry("recipe")


def register_recipe(spec: RecipeSpec) -> RecipeSpec:
    """Register a recipe; raises on a duplicate name."""
    if not dataclasses.is_dataclass(spec.config_cls):
        raise TypeError(f"recipe {spec.name!r}: config_cls must be a dataclass")
    RECIPES.register(spec.name, spec)
    return spec


def build_config(spec: RecipeSpec, **kwargs: Any) -> Any:
    """Instantiate a recipe's config, rejecting unknown keys with the list of known ones."""
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"recipe {spec.name!r} has no setting(s) {unknown}; its settings: {sorted(fields)}")
    return spec.config_cls(**kwargs)
