"""Support for the conformance suite that every registered recipe must pass."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dynnet.api import convert, list_recipes
from dynnet.core import RECIPES, DynamicModel
from dynnet.core.model import DECISION_MODULE_NAMES
from dynnet.models import build_base_model

__all__ = ["DECISION_MODULE_NAMES", "build_recipe_pair", "diverse_inputs", "scramble_gates", "scramble_until_mixed"]


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


def diverse_inputs(n: int, shape: tuple[int, ...], *, seed: int = 1) -> torch.Tensor:
    """Tensor[n, *shape] of noise images whose scale and offset differ per sample, as real images do,
    so that input-dependent gates take different decisions for different samples."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 3.0, n).view(n, *([1] * len(shape)))
    offset = torch.linspace(-1.0, 1.0, n)[torch.randperm(n, generator=g)].view(n, *([1] * len(shape)))
    return torch.randn((n, *shape), generator=g) * scale + offset


def scramble_until_mixed(
    model: nn.Module, x: torch.Tensor, *, tries: int = 32, across_inputs: bool | None = None
) -> int:
    """Scramble the gates with successive seeds until the decisions are mixed.

    Mixed means: some decision differs across the samples of ``x`` (``across_inputs=True``), or, for
    input-independent recipes (``across_inputs=False``), some decision has units both on and off. By default
    the recipe's ``RecipeSpec.input_dependent`` decides (``True`` for a model that is not a converted recipe).

    Returns the seed used. Raises AssertionError when no seed gives mixed decisions: the recipe's
    decisions do not depend on the input, or ``scramble_`` does not reach them.
    """
    from dynnet.core import trace

    if across_inputs is None:
        recipe = getattr(model, "recipe", None)
        across_inputs = RECIPES.get(recipe).input_dependent if recipe in RECIPES else True
    for seed in range(tries):
        scramble_gates(model, seed=seed)
        with torch.no_grad(), trace() as t:
            model.eval()(x)
        for d in t.decisions.values():
            hard = d.hard.detach().flatten(1) if d.hard.dim() > 1 else d.hard.detach().view(-1, 1)
            if across_inputs and not bool((hard == hard[:1]).all()):
                return seed
            if not across_inputs and bool((hard > 0.5).any()) and bool((hard < 0.5).any()):
                return seed
    what = "differ across inputs" if across_inputs else "turn some units off and others on"
    raise AssertionError(f"no scrambling out of {tries} made the decisions {what}")
