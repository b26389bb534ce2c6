"""Anytime evaluation and budget calibration: analytic profiles, and agreement with real sparse execution."""

from __future__ import annotations

import math

import pytest
import torch

import dynnet
from dynnet.methods.early_exit import (
    ExitProfile,
    anytime_curve,
    apply_thresholds,
    budgeted_curve,
    calibrate_,
    calibrate_thresholds,
    collect_exits,
)
from dynnet.testing import scramble_gates
from dynnet.train import evaluate


def _profile(n: int = 2000, seed: int = 0) -> ExitProfile:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand((n, 3), generator=g)
    correct = torch.rand((n, 4), generator=g) < torch.tensor([0.5, 0.6, 0.7, 0.8])
    costs = torch.tensor([25.0, 50.0, 75.0, 100.0], dtype=torch.float64)
    return ExitProfile(scores, correct, correct.long(), costs, 100.0)


def test_apply_thresholds_takes_the_first_exit_reached() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.9], [0.1, 0.1, 0.9], [0.1, 0.1, 0.1]])
    thr = torch.tensor([0.5, 0.5, 0.5])
    assert apply_thresholds(scores, thr).tolist() == [0, 1, 2, 3]
    assert apply_thresholds(scores, torch.full((3,), math.inf)).tolist() == [3, 3, 3, 3]


def test_anytime_curve_is_each_exit_alone() -> None:
    p = _profile()
    curve = anytime_curve(p)
    assert [row["mac_fraction"] for row in curve] == [0.25, 0.5, 0.75, 1.0]
    for k, row in enumerate(curve):
        assert row["accuracy"] == pytest.approx(float(p.correct[:, k].float().mean()))


@pytest.mark.parametrize("target", [0.3, 0.45, 0.6, 0.8, 0.95])
def test_calibration_meets_the_budget_on_its_split_and_on_a_fresh_one(target: float) -> None:
    val, test = _profile(seed=0), _profile(seed=1)
    cal = calibrate_thresholds(val, target)
    assert cal.achieved_fraction == pytest.approx(target, abs=0.01)
    exit_index = apply_thresholds(test.scores, cal.thresholds)
    test_fraction = float(test.costs[exit_index].mean()) / test.dense_macs
    assert test_fraction == pytest.approx(target, rel=0.05)
    assert cal.exit_rates.sum().item() == pytest.approx(1.0)


def test_unreachable_budgets_are_clamped() -> None:
    p = _profile()
    assert calibrate_thresholds(p, 0.05).achieved_fraction == pytest.approx(0.25, abs=2e-3)  # ~all stop at exit 0
    assert calibrate_thresholds(p, 1.0).achieved_fraction == pytest.approx(1.0)  # nobody stops early
    with pytest.raises(ValueError):
        calibrate_thresholds(p, 0.0)


def test_budgeted_curve_rows() -> None:
    rows = budgeted_curve(_profile(seed=0), _profile(seed=1), [0.4, 0.7])
    assert [r["budget"] for r in rows] == [0.4, 0.7]
    assert rows[0]["test_fraction"] < rows[1]["test_fraction"]


def _loader(n: int = 24, batch: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, 16, 16), generator=g) * torch.linspace(0.3, 3.0, n).view(n, 1, 1, 1)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


@pytest.mark.parametrize("recipe", ["branchynet", "adaptive_nn"])
def test_calibrated_model_agrees_with_sparse_evaluation(recipe: str) -> None:
    torch.manual_seed(0)
    model = dynnet.create_model(
        "cifar_resnet8", recipe=recipe, in_channels=1, exit_fractions=(0.01, 0.3, 0.6), budget=0.6
    )
    if recipe == "adaptive_nn":
        scramble_gates(model, seed=3)
    val, test = _loader(seed=0), _loader(seed=1)
    cal = calibrate_(model, val)
    assert torch.equal(model.thresholds, cal.thresholds)
    profile = collect_exits(model, test)
    exit_index = apply_thresholds(profile.scores, model.thresholds)
    expected_acc = float(profile.correct.gather(1, exit_index.view(-1, 1)).float().mean())
    expected_macs = profile.costs[exit_index]
    ev = evaluate(model, test, mode="sparse")
    assert ev.accuracy == pytest.approx(expected_acc)
    torch.testing.assert_close(ev.macs, expected_macs)
    torch.testing.assert_close(ev.executed, expected_macs)
