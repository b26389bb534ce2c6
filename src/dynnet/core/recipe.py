"""The recipe registry: each method of the reading list is a registered :class:`RecipeSpec`."""

from __future__ import annotations

import dataclasses
import math
import numbers
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
        input_dependent: decisions depend on the input. ``False`` for methods whose masks are fixed per
            layer (perforation, bandit-chosen channel subsets): the conformance suite then asks for masks
            that are partial (some units off, some on) instead of masks that differ across inputs.
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
    input_dependent: bool = True


RECIPES: Registry[RecipeSpec] = Registry("recipe")


def register_recipe(spec: RecipeSpec) -> RecipeSpec:
    """Register a recipe; raises on a duplicate name."""
    if not dataclasses.is_dataclass(spec.config_cls):
        raise TypeError(f"recipe {spec.name!r}: config_cls must be a dataclass")
    RECIPES.register(spec.name, spec)
    return spec


def build_config(spec: RecipeSpec, **kwargs: Any) -> Any:
    """Instantiate a recipe's config, rejecting unknown keys with the list of known ones."""
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise TypeError(f"recipe {spec.name!r} has no setting(s) {unknown}; its settings: {sorted(fields)}")
    for key, value in kwargs.items():
        kind = fields[key].type
        annotation = kind if isinstance(kind, str) else getattr(kind, "__name__", "")
        if not _matches_annotation(value, annotation):
            raise TypeError(f"recipe {spec.name!r}: setting {key}={value!r} must be {annotation} (not NaN)")
    return spec.config_cls(**kwargs)


def _matches_annotation(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits a simple annotation (``int``, ``float``, ``bool``, ``str``, unions with ``None``).

    Other annotations (tuples, literals, classes) are not checked here: the config's ``__post_init__`` does.
    """
    options = [o.strip() for o in annotation.split("|")]
    if not options or any(o not in ("int", "float", "bool", "str", "None") for o in options):
        return True
    for o in options:
        if o == "None" and value is None:
            return True
        if o == "bool" and isinstance(value, bool):
            return True
        if isinstance(value, bool):
            continue
        if o == "int" and isinstance(value, numbers.Integral):
            return True
        if o == "float" and isinstance(value, numbers.Real) and not math.isnan(value):
            return True
        if o == "str" and isinstance(value, str):
            return True
    return False
