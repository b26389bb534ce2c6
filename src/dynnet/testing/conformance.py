"""Support for the conformance suite that every registered recipe must pass."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from dynnet.api import convert, list_recipes
from dynnet.core import RECIPES, Decision, DynamicModel, Trace
from dynnet.core.model import DECISION_MODULE_NAMES
from dynnet.models import build_base_model
from dynnet.testing.scramble import randomise

__all__ = [
    "DECISION_MODULE_NAMES",
    "assert_decisions_mixed",
    "build_recipe_pair",
    "decisions_mixed",
    "diverse_inputs",
    "scramble_gates",
    "scramble_until_mixed",
]


def build_recipe_pair(
    recipe: str, *, seed: int = 0, num_classes: int = 10, budget: float | None = None
) -> tuple[nn.Module, DynamicModel]:
    """``(base, converted)``: the recipe's small test base network and its conversion (a copy) at ``budget`` (the
    recipe's default when ``None``)."""
    list_recipes()
    spec = RECIPES.get(recipe)
    torch.manual_seed(seed)
    base = build_base_model(spec.test_base, num_classes=num_classes, in_channels=spec.test_input[0])
    model = convert(copy.deepcopy(base), recipe, budget=budget)
    return base.eval(), model


def scramble_gates(model: nn.Module, *, seed: int = 0, scale: float = 1.0) -> int:
    """Re-initialise every decision-making submodule at random so that gates close for some inputs.

    A recipe whose decisions live elsewhere registers a randomiser for its model class
    (:func:`dynnet.testing.scramble.register_randomiser`; a user's model may define ``scramble_(generator)``); it is
    called instead. Returns how many parameters were changed.
    """
    g = torch.Generator().manual_seed(seed)
    own = randomise(model, g)
    if own is not None:
        return own
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

    Mixed means :func:`decisions_mixed` on ``x``: units both on and off, and some decision that differs across the
    samples of ``x`` (``across_inputs=True``), or, for input-independent recipes (``across_inputs=False``), some
    decision with units both on and off. By default the recipe's ``RecipeSpec.input_dependent`` decides (``True`` for
    a model that is not a converted recipe).

    Returns the seed used. Raises AssertionError when no seed gives mixed decisions: the recipe's
    decisions do not depend on the input, or the model's randomiser does not reach them.
    """
    from dynnet.core import trace

    if across_inputs is None:
        recipe = getattr(model, "recipe", None)
        across_inputs = RECIPES.get(recipe).input_dependent if recipe in RECIPES else True
    for seed in range(tries):
        scramble_gates(model, seed=seed)
        with torch.no_grad(), trace() as t:
            model.eval()(x)
        if decisions_mixed(t.decisions, across_inputs=across_inputs):
            return seed
    what = "differ across inputs" if across_inputs else "turn some units off and others on"
    raise AssertionError(f"no scrambling out of {tries} made the decisions {what}")


def _units(d: Decision) -> torch.Tensor:
    """A decision's hard values as Tensor[N, units]."""
    hard = d.hard.detach()
    return hard.flatten(1) if hard.dim() > 1 else hard.view(-1, 1)


def decisions_mixed(decisions: Mapping[str, Decision], *, across_inputs: bool) -> bool:
    """Whether hard decisions make comparing execution modes meaningful.

    They must turn some units on and some off (over all decisions of the batch) and, with ``across_inputs``, some
    decision must differ across the samples (input-dependent recipes); without it, some decision must have units both
    on and off (input-independent recipes: the same partial mask for every input).
    """
    units = [_units(d) for d in decisions.values()]
    if not (any(bool((u > 0.5).any()) for u in units) and any(bool((u < 0.5).any()) for u in units)):
        return False
    if across_inputs:
        return any(not bool((u == u[:1]).all()) for u in units)
    return any(bool((u > 0.5).any()) and bool((u < 0.5).any()) for u in units)


def assert_decisions_mixed(t: Trace, recipe: str) -> None:
    """The precondition of a test that compares execution modes (sparse with masked, exported with eager): the
    decisions that ``t`` recorded are mixed (:func:`decisions_mixed`; across inputs when the recipe's
    ``RecipeSpec.input_dependent``). All on, all off, or the same for every input would make the comparison vacuous.

    Raises:
        AssertionError: naming the recipe and the mean of each decision.
    """
    across = RECIPES.get(recipe).input_dependent
    if not decisions_mixed(t.decisions, across_inputs=across):
        rates = {name: round(float(_units(d).mean()), 3) for name, d in t.decisions.items()}
        what = "on for some units and inputs, off for others" if across else "on for some units, off for others"
        raise AssertionError(
            f"{recipe}: its scrambled decisions are not {what}, so comparing execution modes tests nothing "
            f"(mean of each decision: {rates}); fix its scrambling (scramble_gates / the model's scramble_)"
        )
