"""`fit(..., budget_ms=...)`: the schedule anneals a fraction of the dense predicted latency and the budget loss reads
predicted latency, not MACs (a made-up latency model: no timing)."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.core.latency import REST, LatencyModel, LatencyTable, PartLatency
from dynnet.data import build_loaders
from dynnet.train import TrainConfig, fit


def _latency_model(model: dynnet.DynamicModel) -> LatencyModel:
    parts = {}
    for name, _ in model.blocks():
        short = name.removeprefix("net.")
        if short.startswith("layer"):
            parts[name] = PartLatency((f"{short}/body", f"{short}/gate"), LatencyTable((0.0, 1.0), (0.05, 1.0)), 1.0)
    parts[REST] = PartLatency((), LatencyTable((1.0,), (0.5,)), 0.5)
    return LatencyModel({"cpu": "test"}, model.recipe, (1, 12, 12), {1: parts})


def test_fit_to_budget_ms_trains_against_the_predicted_latency() -> None:
    loaders = build_loaders("synthetic", batch_size=32, subset=256, in_channels=1, image_size=12, num_train=256)
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="skipnet", width=0.25, in_channels=1)
    lm = _latency_model(model)
    budget_ms = 0.4 * lm.dense_ms()
    result = fit(model, loaders.train, TrainConfig(epochs=1, lr=1e-4), budget_ms=budget_ms, latency_model=lm)
    assert model.latency_model is lm and model.budget_ms == budget_ms
    last = result.history[-1]
    assert last["budget"] == pytest.approx(0.4)
    assert "calibrated_budget" not in last, "no MAC calibration under a latency budget"
    # SkipNet's gates start open: every block runs, so the predicted latency fraction is 1 while the MAC fraction is
    # above 1 (the gates' own MACs); the logged budget loss is the latency one
    model.train()
    with torch.no_grad(), dynnet.trace() as t:
        model(next(iter(loaders.train))[0])
    assert float(t.mac_fraction().mean()) > 1.01
    assert float(t.latency_fraction().mean()) == pytest.approx(1.0)
    assert last["train_budget"] == pytest.approx((1.0 - 0.4) ** 2, rel=1e-4)


def test_a_checkpoint_keeps_the_latency_model_and_budget(tmp_path) -> None:
    from dynnet.train import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="skipnet", width=0.25, in_channels=1)
    lm = _latency_model(model)
    model.set_latency_model_(lm, 0.6 * lm.dense_ms())
    save_checkpoint(tmp_path / "ck", model)
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.latency_model is not None and loaded.latency_model.as_dict() == lm.as_dict()
    assert loaded.budget_ms == pytest.approx(0.6 * lm.dense_ms())
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad(), dynnet.trace() as a:
        model.eval()(x)
    with torch.no_grad(), dynnet.trace() as b:
        loaded.eval()(x)
    torch.testing.assert_close(b.latency(), a.latency())  # the loaded model predicts the same milliseconds
