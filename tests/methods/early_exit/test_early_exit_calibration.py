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
from dynnet.methods.early_exit._common import budget_exit_weights, geometric_exit_shares
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


COSTS = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_geometric_exit_shares_spend_the_budget(budget: float) -> None:
    q = geometric_exit_shares(COSTS, budget)
    assert float(q.sum()) == pytest.approx(1.0)
    assert float(q @ COSTS) == pytest.approx(budget, abs=1e-9)
    ratios = q[1:] / q[:-1]
    torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios))  # q_k ∝ p^k


def test_geometric_exit_shares_clamp_unreachable_budgets() -> None:
    assert float(geometric_exit_shares(COSTS, 0.1)[0]) == pytest.approx(1.0)
    assert float(geometric_exit_shares(COSTS, 1.0)[-1]) == pytest.approx(1.0)


def test_budget_exit_weights_favour_the_exits_the_budget_uses() -> None:
    low, high = budget_exit_weights(COSTS, 0.35), budget_exit_weights(COSTS, 0.9)
    for w in (low, high):
        assert sum(w) / len(w) == pytest.approx(1.0)
        assert min(w) >= 0.5
    assert low[0] > low[-1] and high[-1] > high[0] and low[0] > high[0]
    assert budget_exit_weights(COSTS, 0.625) == pytest.approx([1.0] * 4)  # p = 1: every exit serves a quarter


def test_dynnet_calibrate_is_the_budgeted_batch_calibration() -> None:
    def build() -> dynnet.DynamicModel:
        torch.manual_seed(0)
        return dynnet.create_model(
            "cifar_resnet8", recipe="branchynet", in_channels=1, exit_fractions=(0.01, 0.3, 0.6), budget=0.6
        )

    model = build()
    val = _loader(seed=0)
    expected = calibrate_thresholds(collect_exits(model, val), 0.6)
    images = torch.cat([x for x, _ in val])
    report = dynnet.calibrate(model, images, tolerance=0.05)  # unlabelled images are enough
    torch.testing.assert_close(model.thresholds, expected.thresholds)
    assert report.thresholds["exit profile p"] == pytest.approx(expected.p)
    assert report.mac_fraction == pytest.approx(expected.achieved_fraction, abs=1e-6)
    assert report.accuracy is None
    assert float(model.calibration[0]) == pytest.approx(expected.p)
    labelled = dynnet.calibrate(model, val, 0.6, tolerance=0.05)
    assert labelled.accuracy == pytest.approx(expected.accuracy)
    other = build()
    other.load_state_dict(model.state_dict())  # the thresholds are in the state_dict
    assert torch.equal(other.thresholds, model.thresholds) and other.calibrated_budget == pytest.approx(0.6)


def test_calibration_refuses_a_budget_below_the_first_exit() -> None:
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="branchynet", in_channels=1).eval()  # first exit ≈ 0.46
    with pytest.raises(ValueError, match=r"outside the MAC fractions \[0\.4"):
        model.calibrate_to_([torch.cat([x for x, _ in _loader()])], 0.3, 0.01)


def test_calibration_without_labels_has_no_accuracy() -> None:
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="branchynet", in_channels=1, exit_fractions=(0.01, 0.3, 0.6))
    profile = collect_exits(model, [x for x, _ in _loader()])
    assert profile.correct is None and profile.scores.shape == (24, 3)
    assert calibrate_thresholds(profile, 0.5).accuracy is None
    assert all(row["accuracy"] is None for row in anytime_curve(profile))
