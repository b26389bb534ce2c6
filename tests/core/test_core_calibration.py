"""`dynnet.calibrate`: the data it takes, the report it returns and the errors it gives."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import dynnet
from dynnet.calibration import collect_batches
from dynnet.core.budget import BudgetPolicy, Knob, search_knob
from dynnet.testing import diverse_inputs, scramble_until_mixed


@pytest.fixture
def model() -> dynnet.DynamicModel:
    torch.manual_seed(0)
    m = dynnet.create_model("cifar_resnet8", recipe="convnet_aig", width=0.5, in_channels=1)
    scramble_until_mixed(m, diverse_inputs(8, (1, 16, 16), seed=1))
    return m


def _fraction(model: dynnet.DynamicModel, x: torch.Tensor) -> float:
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    return float(t.mac_fraction().mean())


def test_tensor_loader_and_batches_give_the_same_calibration(model: dynnet.DynamicModel) -> None:
    x = diverse_inputs(96, (1, 16, 16), seed=3)
    y = torch.arange(96) % 10
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reports = []
    for data in (x, DataLoader(TensorDataset(x, y), batch_size=32), list(x.split(40))):
        model.load_state_dict(state)
        reports.append(dynnet.calibrate(model, data, 0.5, tolerance=0.02))
    assert all(r.within_tolerance for r in reports)
    assert reports[0].thresholds == reports[1].thresholds == reports[2].thresholds
    assert reports[0].accuracy is None and reports[2].accuracy is None
    assert reports[1].accuracy is not None and 0.0 <= reports[1].accuracy <= 1.0
    assert reports[1].images == 96


def test_calibration_moves_the_fraction_and_restores_modes(model: dynnet.DynamicModel) -> None:
    x = diverse_inputs(128, (1, 16, 16), seed=3)
    model.train()
    before = _fraction(model, x)
    model.train()
    target = 0.4 if before > 0.55 else 0.8
    report = dynnet.calibrate(model, x, target)
    assert model.training, "calibrate restores the training flag"
    assert all(b.mode == "sparse" for _, b in model.blocks()), "sparse mode set by _fraction above is kept"
    assert report.before == pytest.approx(before, abs=1e-9)
    assert report.mac_fraction == pytest.approx(target, abs=0.01)
    assert _fraction(model, x) == pytest.approx(report.mac_fraction, abs=1e-9)
    assert "budget" in report.summary() and "achieved" in report.summary()


def test_max_images_limits_the_data(model: dynnet.DynamicModel) -> None:
    xs, ys = collect_batches(diverse_inputs(100, (1, 16, 16)), max_images=70, batch_size=32)
    assert [x.shape[0] for x in xs] == [32, 32, 6] and ys is None


@pytest.mark.parametrize(
    ("data", "budget", "error", "match"),
    [
        ("text", 0.5, TypeError, "calibration data"),
        (torch.zeros(0, 1, 16, 16), 0.5, ValueError, "no image"),
        (torch.zeros(4, 16, 16), 0.5, ValueError, "N, C, H, W"),
        (None, 1.5, ValueError, "fraction in"),
        (None, 0.001, ValueError, "outside"),
    ],
)
def test_bad_calibration_arguments_get_one_clear_error(model, data, budget, error, match) -> None:
    data = diverse_inputs(16, (1, 16, 16)) if data is None else data
    with pytest.raises(error, match=match):
        dynnet.calibrate(model, data, budget)


def test_calibrate_refuses_a_static_network() -> None:
    with pytest.raises(TypeError, match="converted model"):
        dynnet.calibrate(torch.nn.Linear(2, 2), torch.zeros(1, 1, 2, 2), 0.5)


def test_search_knob_on_a_known_monotone_function() -> None:
    """A decreasing integer knob: the fraction is 1 - v / 10 (v in 0..10); budget 0.3 is v = 7."""
    state = {"v": 0.0}

    class Fake(torch.nn.Module):
        recipe = "fake"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            from dynnet.core import current_trace

            t = current_trace()
            t.record_macs("all", 100.0 * (1 - state["v"] / 10), batch_size=x.shape[0], dense=100.0)
            return x

    knob = Knob("v", lambda: state["v"], lambda v: state.update(v=v), 0, 10, increasing=False, integer=True)
    value, fraction, evaluations = search_knob(Fake(), knob, [torch.zeros(2, 1, 1, 1)], 0.3, 0.01)
    assert value == 7 and fraction == pytest.approx(0.3) and evaluations <= 8
    with pytest.raises(ValueError, match=r"outside the MAC fractions \[0.000, 1.000\]"):
        search_knob(Fake(), knob, [torch.zeros(2, 1, 1, 1)], 1.5, 0.01)


def test_search_knob_widens_an_unbounded_knob() -> None:
    """A logit offset whose gates outgrew ±30: the fraction is sigmoid((v + 100) / 10); budget 0.5 is v = -100,
    reached only by widening the range (-30 → -60 → -120), and never beyond the limit."""
    state = {"v": 0.0}

    class Fake(torch.nn.Module):
        recipe = "fake"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            from dynnet.core import current_trace

            fraction = 1 / (1 + math.exp(-(state["v"] + 100) / 10))
            current_trace().record_macs("all", 100.0 * fraction, batch_size=x.shape[0], dense=100.0)
            return x

    bounded = Knob("v", lambda: state["v"], lambda v: state.update(v=v), -30, 30)
    with pytest.raises(ValueError, match="outside the MAC fractions"):
        search_knob(Fake(), bounded, [torch.zeros(2, 1, 1, 1)], 0.5, 0.01)
    unbounded = Knob("v", lambda: state["v"], lambda v: state.update(v=v), -30, 30, limit=1e3)
    value, fraction, _ = search_knob(Fake(), unbounded, [torch.zeros(2, 1, 1, 1)], 0.5, 0.01)
    assert value == pytest.approx(-100, abs=0.3) and fraction == pytest.approx(0.5, abs=0.005)
    capped = Knob("v", lambda: state["v"], lambda v: state.update(v=v), -30, 30, limit=60)
    with pytest.raises(ValueError, match=r"outside the MAC fractions \[0.982, 1.000\]"):
        search_knob(Fake(), capped, [torch.zeros(2, 1, 1, 1)], 0.002, 0.001)
    assert state["v"] == pytest.approx(-100, abs=0.3)  # a failed search leaves the knob where it was
    with pytest.raises(ValueError, match="limit"):
        Knob("v", lambda: 0.0, lambda v: None, -30, 30, limit=10)


def test_budget_policy_validates() -> None:
    with pytest.raises(ValueError, match="how"):
        BudgetPolicy("sometimes")
    with pytest.raises(ValueError, match="reachable"):
        BudgetPolicy("calibrated", reachable=(0.5, 0.2))
    assert BudgetPolicy("trained+calibrated").calibrated and BudgetPolicy("trained").trained
    assert not BudgetPolicy("fixed", knob="").calibrated
