"""`dynnet.calibrate(model, data, budget_ms=...)`: the knob moves until the *timer's* latency is within 3 % of the
target. The timer is injected: a deterministic one whose milliseconds are the executed MACs, so no test depends on
this machine's speed."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.core import RECIPES
from dynnet.testing import build_recipe_pair, diverse_inputs, scramble_until_mixed

pytestmark = pytest.mark.usefixtures("one_thread")


def mac_timer(model: torch.nn.Module, batches) -> float:
    """ms per image = 0.05 + one ns per executed MAC (a machine whose every MAC costs the same)."""
    total, images = 0.0, 0
    with torch.no_grad():
        for x in batches:
            with dynnet.trace() as t:
                model(x)
            total += float(t.executed_macs().sum())
            images += x.shape[0]
    return 0.05 + 1e-6 * total / images


def _span(model: dynnet.DynamicModel, x: torch.Tensor) -> tuple[float, float]:
    """The timer's latency with the recipe calibrated to its lowest and highest reachable fractions."""
    reach = RECIPES.get(model.recipe).budget.reachable
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dynnet.sparse(model)
    lo = (dynnet.calibrate(model, x, max(0.3, reach[0] + 0.05), tolerance=0.05), mac_timer(model, [x]))[1]
    model.load_state_dict(state)
    hi = (dynnet.calibrate(model, x, 0.95, tolerance=0.05), mac_timer(model, [x]))[1]
    model.load_state_dict(state)
    return lo, hi


@pytest.mark.parametrize("recipe", ["convnet_aig", "dynexit"])
def test_calibrate_to_milliseconds_lands_within_three_percent(recipe: str) -> None:
    _, model = build_recipe_pair(recipe)
    x = diverse_inputs(64, (3, 32, 32), seed=3)
    scramble_until_mixed(model, x[:8])
    lo, hi = _span(model, x)
    target = lo + 0.5 * (hi - lo)
    model.train()
    report = dynnet.calibrate(model, x, budget_ms=target, timer=mac_timer)
    assert model.training, "the training flag is restored"
    assert report.budget_ms == target and report.within_tolerance
    assert report.latency_ms == pytest.approx(target, rel=0.03)
    dynnet.sparse(model)
    assert mac_timer(model, [x]) == pytest.approx(report.latency_ms, rel=1e-9), "the report is the final setting"
    assert "ms" in report.summary() and report.thresholds


def test_latency_budget_out_of_reach_names_the_range() -> None:
    _, model = build_recipe_pair("convnet_aig")
    x = diverse_inputs(32, (3, 32, 32), seed=3)
    with pytest.raises(ValueError, match=r"outside the latencies \(ms\)"):
        dynnet.calibrate(model, x, budget_ms=1e-4, timer=mac_timer)
    with pytest.raises(ValueError, match="not both"):
        dynnet.calibrate(model, x, 0.5, budget_ms=1.0, timer=mac_timer)
