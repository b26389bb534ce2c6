"""`fit` calibrates to the budget on the validation split at the end of training, and checkpoints carry it."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.data import build_loaders
from dynnet.testing import scramble_until_mixed
from dynnet.train import TrainConfig, evaluate, fit, load_checkpoint


@pytest.fixture(scope="module")
def loaders():
    return build_loaders(
        "synthetic", batch_size=32, subset=256, in_channels=1, image_size=12, num_train=640, num_test=256,
        val_fraction=0.4,
    )  # fmt: skip


def _model(**kw) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe="convnet_aig", width=0.25, in_channels=1, **kw)


def test_fit_calibrates_to_the_budget_on_validation(loaders, tmp_path) -> None:
    model = _model(budget=0.6)
    result = fit(model, loaders.train, TrainConfig(epochs=2, lr=0.2, out_dir=tmp_path), val_loader=loaders.val)
    cal = result.calibration
    assert cal is not None and result.calibration_error is None
    assert cal.budget == 0.6 and cal.within_tolerance
    assert result.val.mac_fraction == pytest.approx(0.6, abs=0.01)  # val re-evaluated after calibration
    last = result.history[-1]
    assert last["calibrated_budget"] == 0.6 and last["val_mac_fraction"] == pytest.approx(result.val.mac_fraction)
    assert model.calibrated_budget == pytest.approx(0.6)
    # Held-out test images: within 0.03 of the budget.
    assert evaluate(model, loaders.test, mode="sparse").mac_fraction == pytest.approx(0.6, abs=0.03)
    # The final checkpoint carries the calibrated thresholds.
    loaded, _ = load_checkpoint(result.checkpoint)
    assert loaded.calibrated_budget == pytest.approx(0.6)
    torch.testing.assert_close(loaded.calibration, model.calibration)


def test_fit_without_validation_or_with_calibrate_off_does_not_calibrate(loaders) -> None:
    model = _model()
    assert fit(model, loaders.train, TrainConfig(max_steps=2)).calibration is None
    result = fit(model, loaders.train, TrainConfig(max_steps=2, calibrate=False), val_loader=loaders.val)
    assert result.calibration is None and result.calibration_error is None
    assert model.calibrated_budget is None


def test_unreachable_budget_is_logged_not_lost(loaders, caplog) -> None:
    """A budget the trained gates cannot reach on validation: the run still returns, with the reason."""
    model = _model(budget=0.06)  # inside ConvNet-AIG's declared range, below what a ResNet-8's stem leaves
    with caplog.at_level("WARNING", logger="dynnet.train"):
        result = fit(model, loaders.train, TrainConfig(max_steps=2), val_loader=loaders.val)
    assert result.calibration is None and "outside" in (result.calibration_error or "")
    assert any("calibration to budget" in r.message for r in caplog.records)


def test_bad_calibrate_tolerance_is_refused() -> None:
    with pytest.raises(ValueError, match="calibrate_tolerance"):
        TrainConfig(calibrate_tolerance=0.0)


def _train_fraction(model: dynnet.DynamicModel, loaders) -> float:
    from dynnet.core.budget import mean_mac_fraction

    x = torch.cat([x for x, _ in loaders.train])
    dynnet.set_mode(model.eval(), "sparse")
    return mean_mac_fraction(model, list(x.split(64)))


@pytest.mark.parametrize("recipe", ["convnet_aig", "channel_gating"])
def test_budget_tracking_keeps_training_at_the_annealed_budget(loaders, recipe) -> None:
    """Gates that start open and a budget loss too weak to move them in a few steps: without tracking the model
    ends training near the dense cost (precondition); with it, training ends at the budget on its own images."""
    config = dict(epochs=1, lr=1e-4, budget=0.5, budget_start=1.0, budget_warmup_epochs=0.5, calibrate=False)
    fractions = {}
    for every in (0, 2):
        torch.manual_seed(0)
        model = dynnet.create_model("cifar_resnet8", recipe=recipe, width=0.25, in_channels=1, budget=0.5)
        result = fit(model, loaders.train, TrainConfig(**config, track_budget_every=every))
        fractions[every] = _train_fraction(model, loaders)
        if every:
            assert result.history[-1]["tracked_thresholds"]  # the knob it moved, logged
    assert fractions[0] > 0.85
    assert fractions[2] == pytest.approx(0.5, abs=0.06)


def test_budget_tracking_is_off_for_static_networks_and_checked(loaders) -> None:
    torch.manual_seed(0)
    static = dynnet.create_model("cifar_resnet8", width=0.25, in_channels=1)
    history = fit(static, loaders.train, TrainConfig(max_steps=3, budget=0.5, track_budget_every=1)).history
    assert "tracked_thresholds" not in history[-1] and "train_loss" in history[-1]
    with pytest.raises(ValueError, match="track_budget_every"):
        TrainConfig(track_budget_every=-1)
    from dynnet.train.hooks import BudgetTracking

    with pytest.raises(ValueError, match="every"):
        BudgetTracking(0)


def test_lagrange_tracking_pulls_a_model_over_budget_down_without_moving_a_threshold(loaders) -> None:
    """ "lagrange" mode: gates start open (fraction ~1 > 0.5): the multiplier grows, the loss carries
    λ · (fraction - budget), the training MAC fraction falls, and no threshold is moved from outside."""
    fractions = {}
    for mode in ("knob", "lagrange"):
        torch.manual_seed(0)
        model = dynnet.create_model(
            "cifar_resnet8", recipe="convnet_aig", width=0.25, in_channels=1, budget=0.5, rate_weight=0.0
        )
        offset = float(model.calibration[0])
        every = 0 if mode == "knob" else 1  # knob mode off: the baseline
        config = TrainConfig(epochs=3, lr=0.05, budget=0.5, calibrate=False, track_budget_every=every,
                             track_budget=mode)  # fmt: skip
        result = fit(model, loaders.train, config)
        fractions[mode] = result.history[-1]["train_mac_fraction"]
        if every:
            assert result.history[-1]["budget_multiplier"] > 0 and "train_lagrange" in result.history[-1]
            assert float(model.calibration[0]) == offset  # no knob moved
    assert fractions["knob"] > 0.8  # precondition: without tracking the gates stay near open
    assert fractions["lagrange"] < fractions["knob"] - 0.1
    with pytest.raises(ValueError, match="track_budget"):
        TrainConfig(track_budget="bias")


def test_batch_norm_statistics_are_reestimated_under_the_decisions_and_gates_keep_theirs() -> None:
    from dynnet.calibration import reestimate_batch_norm

    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="channel_gating", in_channels=1).eval()
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    scramble_until_mixed(model, x[:8])
    bn = model.net.layer1[0].bn1
    gate_norm = model.net.layer1[0].conv1.gate.norm
    gate_before = gate_norm.running_mean.clone()
    seen = []
    hook = bn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach()))
    dynnet.set_mode(model, "sparse")
    count = reestimate_batch_norm(model, x, batch_size=32)
    hook.remove()
    inputs = torch.cat(seen)
    assert count == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.net.modules()) - 6  # six gate norms kept
    torch.testing.assert_close(bn.running_mean, inputs.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, inputs.var((0, 2, 3)), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(gate_norm.running_mean, gate_before)
    assert not model.training and {b.mode for _, b in model.blocks()} == {"sparse"}  # modes restored
    report = dynnet.calibrate(model, x, 0.6, tolerance=0.05, bn_data=x)
    assert report.batch_norms == count and abs(report.mac_fraction - 0.6) <= 0.05
