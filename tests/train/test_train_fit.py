"""`fit` and `evaluate` on a tiny learnable problem."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynnet
from dynnet.core import dynamic_blocks
from dynnet.data import build_loaders
from dynnet.train import TrainConfig, evaluate, fit


@pytest.fixture(scope="module")
def loaders():
    return build_loaders(
        "synthetic", batch_size=32, subset=256, in_channels=1, image_size=12, num_train=320, num_test=96
    )


def _model(seed: int = 0, **kw) -> dynnet.DynamicModel:
    torch.manual_seed(seed)
    return dynnet.create_model("cifar_resnet8", recipe="convnet_aig", width=0.25, in_channels=1, **kw)


def _train_loss(model: nn.Module, loader) -> float:
    return evaluate(model, loader, mode="masked").loss


def test_fit_decreases_the_loss(loaders) -> None:
    model = _model()
    before = _train_loss(model, loaders.train)
    # calibrate=False: the loss of training alone (end-of-fit calibration has its own tests).
    result = fit(model, loaders.train, TrainConfig(epochs=3, lr=0.2, calibrate=False), val_loader=loaders.val)
    after = _train_loss(model, loaders.train)
    assert after < 0.7 * before
    assert len(result.history) == 3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.val is not None and result.val.mode == "sparse"
    assert result.checkpoint is None


def test_fit_trains_a_static_module(loaders) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 10))
    before = _train_loss(model, loaders.train)
    result = fit(model, loaders.train, TrainConfig(epochs=2, lr=0.05, optimizer="adamw", weight_decay=0.0))
    assert _train_loss(model, loaders.train) < before
    assert "train_mac_fraction" not in result.history[0]


def test_budget_loss_pulls_the_mac_fraction_down(loaders) -> None:
    model = _model(rate_weight=10.0)
    start = evaluate(model, loaders.test, mode="sparse").mac_fraction
    assert start > 0.99  # gates start open
    fit(model, loaders.train, TrainConfig(epochs=6, lr=0.2, budget=0.2))
    end = evaluate(model, loaders.test, mode="sparse").mac_fraction
    assert end < 0.6


def test_gate_collapse_detection(loaders, caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    gate = {b.block_name: b for _, b in dynamic_blocks(model)}["layer2.0"].gate
    with torch.no_grad():  # force the gate shut: "off" logit far above "on"
        gate.fc2.bias.copy_(torch.tensor([100.0, -100.0]))
    with caplog.at_level(logging.WARNING, logger="dynnet.train"):
        result = fit(model, loaders.train, TrainConfig(epochs=1, lr=1e-5, max_steps=3))
    entry = result.history[-1]
    assert "layer2.0:off" in entry["collapsed_gates"]
    assert entry["gate_rates"]["layer2.0"] == 0.0
    assert any("layer2.0:off" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_dead_exit_detection(loaders, caplog: pytest.LogCaptureFixture) -> None:
    """An early exit that no sample takes during an epoch is reported like a gate that is always off, unless it is
    idle by construction (threshold "never" until calibration): then it is left out, and no warning cries wolf."""
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="branchynet", width=0.25, in_channels=1)
    assert model.idle_decisions() == {f"exit{k}" for k in range(model.num_exits - 1)}
    with caplog.at_level(logging.WARNING, logger="dynnet.train"):
        result = fit(model, loaders.train, TrainConfig(epochs=1, lr=1e-5, max_steps=2, calibrate=False))
    entry = result.history[-1]
    assert entry["collapsed_gates"] == [] and not any("collapsed" in r.getMessage() for r in caplog.records)
    model.set_thresholds([1.5] * (model.num_exits - 1))  # finite, yet above every confidence: dead, not idle
    assert model.idle_decisions() == set()
    result = fit(model, loaders.train, TrainConfig(epochs=1, lr=1e-5, max_steps=2, calibrate=False))
    entry = result.history[-1]
    exits = [k for k in entry["gate_rates"] if k.startswith("exit")]
    assert exits, "exit decisions must be tracked"
    assert all(f"{k}:off" in entry["collapsed_gates"] for k in exits)


def test_max_steps_stops_early(loaders) -> None:
    model = _model()
    result = fit(model, loaders.train, TrainConfig(epochs=5, lr=0.01, max_steps=3))
    assert result.history[-1]["step"] == 3 and len(result.history) == 1


def test_evaluate_agrees_with_manual_computation(loaders) -> None:
    from dynnet.testing import scramble_gates

    model = _model()
    scramble_gates(model, seed=3)
    result = evaluate(model, loaders.test, mode="sparse")
    xs, ys = zip(*list(loaders.test), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    model.eval()
    with torch.no_grad(), dynnet.trace() as t:
        logits = model(x)  # the whole split as one batch: same decisions (eval mode, no noise)
    torch.testing.assert_close(result.logits, logits, rtol=1e-4, atol=1e-5)
    assert result.accuracy == pytest.approx(float((logits.argmax(1) == y).double().mean()))
    assert result.loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    torch.testing.assert_close(result.macs, t.macs())
    torch.testing.assert_close(result.executed, t.executed_macs())
    assert result.dense_macs == t.dense_macs()
    assert result.mac_fraction == pytest.approx(float(t.macs().mean()) / t.dense_macs())
    assert 0.0 < result.mac_fraction < 1.0  # scrambled gates skip some blocks
    for name, d in t.decisions.items():
        assert result.decision_rates[name] == pytest.approx(float(d.hard.float().mean()))
    # sparse and masked execution agree on predictions; evaluate leaves the model in the requested mode
    masked = evaluate(model, loaders.test, mode="masked")
    assert masked.accuracy == result.accuracy
    torch.testing.assert_close(masked.macs, result.macs)
    assert {b.mode for _, b in dynamic_blocks(model)} == {"masked"} and not model.training


def test_evaluate_static_model_macs_are_dense(loaders) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 10))
    result = evaluate(model, loaders.test, max_batches=1)
    assert result.num_samples == 32
    assert torch.all(result.macs == 1440)
    assert result.mac_fraction == 1.0
