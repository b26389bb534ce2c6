"""The budget part of the conformance suite: every recipe declares how it honours a budget, and hits it.

A budget is the target mean fraction of the dense MACs per image. For every recipe that declares a calibrated
budget, :func:`dynnet.calibrate` on some images must bring the MAC fraction on *other* images of the same
distribution within 0.03 of the budget, survive a ``state_dict`` round-trip, and refuse budgets outside the range.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import dynnet
from dynnet.core import RECIPES
from dynnet.core.budget import BUDGET_HOWS
from dynnet.testing import build_recipe_pair, diverse_inputs, scramble_until_mixed

RECIPE_NAMES = dynnet.list_recipes()
CALIBRATED = [r for r in RECIPE_NAMES if RECIPES.get(r).budget.calibrated]
CALIBRATION_IMAGES = 256
HELD_OUT_TOLERANCE = 0.03


def _inputs(recipe: str, n: int, seed: int) -> torch.Tensor:
    return diverse_inputs(n, RECIPES.get(recipe).test_input, seed=seed)


def _budgets(recipe: str) -> list[float]:
    """0.35, 0.5 and 0.75, each moved inside the declared reachable range."""
    lo, hi = RECIPES.get(recipe).budget.reachable
    return sorted({round(min(max(b, lo + 0.02), hi - 0.02), 3) for b in (0.35, 0.5, 0.75)})


def _mixed(recipe: str) -> dynnet.DynamicModel:
    _, model = build_recipe_pair(recipe)
    scramble_until_mixed(model, _inputs(recipe, 8, seed=1), across_inputs=RECIPES.get(recipe).input_dependent)
    return model.eval()


def _held_out_fraction(model: dynnet.DynamicModel, x: torch.Tensor) -> float:
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    return float(t.mac_fraction().mean())


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_budget_is_declared_and_means_mac_fraction(recipe: str) -> None:
    spec = RECIPES.get(recipe)
    assert spec.budget is not None and spec.budget.how in BUDGET_HOWS
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    assert "budget" in fields, f"{recipe}: its config has no budget"
    lo, hi = spec.budget.reachable
    assert lo <= fields["budget"].default <= hi
    doc = (spec.config_cls.__doc__ or "").lower()
    for word in ("unused", "nominal", "kept for the common api"):
        assert word not in doc, f"{recipe}: its config documents the budget as {word!r}"


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_budget_outside_the_declared_range_is_refused(recipe: str) -> None:
    spec = RECIPES.get(recipe)
    lo, hi = spec.budget.reachable
    base, _ = build_recipe_pair(recipe)
    if lo > 0.02:
        with pytest.raises(ValueError, match="reach"):
            dynnet.convert(copy.deepcopy(base), recipe, budget=lo / 2)
    if hi < 0.98:
        with pytest.raises(ValueError, match="reach"):
            dynnet.convert(copy.deepcopy(base), recipe, budget=min(1.0, hi + 0.02))


@pytest.mark.parametrize("recipe", CALIBRATED)
def test_calibrate_hits_the_budget_on_held_out_inputs(recipe: str) -> None:
    model = _mixed(recipe)
    x = _inputs(recipe, CALIBRATION_IMAGES, seed=11)
    held_out = _inputs(recipe, CALIBRATION_IMAGES, seed=12)
    fractions = []
    for budget in _budgets(recipe):
        report = dynnet.calibrate(model, x, budget)
        assert report.within_tolerance, f"{recipe}: {report.summary()}"
        assert model.calibrated_budget == pytest.approx(budget)
        held = _held_out_fraction(model, held_out)
        assert held == pytest.approx(budget, abs=HELD_OUT_TOLERANCE), f"{recipe}: held-out {held:.3f}, {report}"
        fractions.append(held)
    assert fractions == sorted(fractions), f"{recipe}: larger budgets must not spend less: {fractions}"


@pytest.mark.parametrize("recipe", CALIBRATED)
def test_calibration_round_trips_through_state_dict(recipe: str) -> None:
    model = _mixed(recipe)
    x = _inputs(recipe, 64, seed=11)
    budget = _budgets(recipe)[1 if len(_budgets(recipe)) > 1 else 0]
    dynnet.calibrate(model, x, budget, tolerance=0.05)
    _, other = build_recipe_pair(recipe, seed=7)
    other.load_state_dict(copy.deepcopy(model.state_dict()), strict=True)
    assert other.calibrated_budget == pytest.approx(budget)
    held_out = _inputs(recipe, 32, seed=12)
    assert _held_out_fraction(other.eval(), held_out) == pytest.approx(_held_out_fraction(model, held_out), abs=1e-9)
    dynnet.sparse(other)
    torch.testing.assert_close(other(held_out), model(held_out), rtol=0, atol=0)


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_outside_the_reachable_range_calibration_raises(recipe: str) -> None:
    spec = RECIPES.get(recipe)
    model = _mixed(recipe)
    x = _inputs(recipe, 16, seed=11)
    if not spec.budget.calibrated:
        with pytest.raises(ValueError, match="cannot be calibrated"):
            dynnet.calibrate(model, x, spec.budget.reachable[0])
        return
    with pytest.raises(ValueError, match="outside"):
        dynnet.calibrate(model, x, 1e-4)


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_the_budget_changes_the_model(recipe: str) -> None:
    """Conversions at three budgets (same weights, same decisions made mixed) must not all be the same model: they
    differ in their training objective (trained budgets) or in the MACs they spend (budgets derived into a knob at
    conversion). Three, because a squared budget loss takes one value at two budgets symmetric about the rate."""
    spec = RECIPES.get(recipe)
    lo, hi = spec.budget.reachable
    budgets = sorted({min(max(b, lo), hi) for b in (0.4, 0.6, 0.8)})
    assert len(budgets) == 3, f"{recipe}: reachable range {lo}-{hi} too narrow to test"
    x = _inputs(recipe, 8, seed=1)
    y = torch.arange(8) % 10
    outcomes = []
    for budget in budgets:
        torch.manual_seed(0)
        base, _ = build_recipe_pair(recipe)
        model = dynnet.convert(copy.deepcopy(base), recipe, budget=budget)
        scramble_until_mixed(model, x, across_inputs=spec.input_dependent)
        torch.manual_seed(0)
        model.train()
        with dynnet.trace() as t:
            logits = model(x)
        loss = float(model.compute_loss(logits, y, t).total.detach())
        outcomes.append((loss, _held_out_fraction(model.eval(), x)))
    losses = {round(loss, 5) for loss, _ in outcomes}
    fractions = {round(frac, 6) for _, frac in outcomes}
    assert len(losses) > 1 or len(fractions) > 1, f"{recipe}: budgets {budgets} build the same model: {outcomes}"
