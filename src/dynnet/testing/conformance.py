"""Support for the conformance suite that every registered recipe must pass."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dynnet.api import convert, list_recipes
from dynnet.core import RECIPES, DynamicModel
from dynnet.models import build_base_model

__all__ = ["DECISION_MODULE_NAMES", "build_recipe_pair", "scramble_gates"]

# Submodules with these names produce decisions; scrambling them makes decisions differ across inputs.
DECISION_MODULE_NAMES = frozenset({"gate", "gates", "policy", "controller", "router", "halting", "saliency"})


def build_recipe_pair(recipe: str, *, seed: int = 0, num_classes: int = 10) -> tuple[nn.Module, DynamicModel]:
    """``(base, converted)``: the recipe's small test base network and its conversion (a copy)."""
    list_recipes()
    spec = RECIPES.get(recipe)
    torch.manual_seed(seed)
    base = build_base_model(spec.test_base, num_classes=num_classes, in_channels=spec.test_input[0])
    model = convert(copy.deepcopy(base), recipe)
    return base.eval(), model


def scramble_gates(model: nn.Module, *, seed: int = 0, scale: float = 1.0) -> int:
    """Re-initialise every decision-making submodule at random so that gates close for some inputs.

    A recipe whose decisions live elsewhere can define ``scramble_(generator)`` on its model; it is
    called instead. Returns how many parameters were changed.
    """
    g = torch.Generator().manual_seed(seed)
    if hasattr(model, "scramble_"):
        return model.scramble_(g)
    changed = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not DECISION_MODULE_NAMES.intersection(name.split(".")[:-1]):
                continue
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * scale / fan_in**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            changed += 1
    return changed
