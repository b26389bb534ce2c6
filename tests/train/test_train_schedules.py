"""Schedules (pure functions), their use inside `fit`, and TrainConfig validation."""

from __future__ import annotations

import math

import pytest
import torch

import dynnet
from dynnet.core import dynamic_blocks
from dynnet.data import build_loaders
from dynnet.train import Hook, TrainConfig, budget_at, fit, lr_factor, tau_at


def test_lr_factor_warmup_then_cosine() -> None:
    assert lr_factor(0, 10, warmup_steps=4) == pytest.approx(1 / 5)
    assert lr_factor(3, 10, warmup_steps=4) == pytest.approx(4 / 5)
    assert lr_factor(4, 10, warmup_steps=4) == pytest.approx(1.0)
    assert lr_factor(7, 10, warmup_steps=4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert lr_factor(10, 10) == pytest.approx(0.0)
    assert lr_factor(5, 10, cosine=False) == 1.0


def test_tau_schedules() -> None:
    assert tau_at(0.0, 5.0, 0.5) == pytest.approx(5.0)
    assert tau_at(0.5, 5.0, 0.5) == pytest.approx(math.sqrt(5.0 * 0.5))  # geometric mean halfway
    assert tau_at(1.0, 5.0, 0.5) == pytest.approx(0.5)
    assert tau_at(2.0, 5.0, 0.5) == pytest.approx(0.5)  # clamped
    assert tau_at(0.25, 2.0, 1.0, kind="linear") == pytest.approx(1.75)
    assert tau_at(0.7, 3.0, None) == 3.0
    with pytest.raises(ValueError, match="exponential"):
        tau_at(0.5, 1.0, 2.0, kind="cubic")


def test_budget_schedule() -> None:
    assert budget_at(0.0, 0.5, start=1.0, warmup_epochs=2) == pytest.approx(1.0)
    assert budget_at(1.0, 0.5, start=1.0, warmup_epochs=2) == pytest.approx(0.75)
    assert budget_at(5.0, 0.5, start=1.0, warmup_epochs=2) == pytest.approx(0.5)
    assert budget_at(0.0, 0.5) == 0.5
    assert budget_at(0.3, None, start=1.0, warmup_epochs=1) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"budget": 1.5}, "budget"),
        ({"tau_end": 0.5}, "tau_start"),
        ({"resume": True}, "out_dir"),
        ({"eval_mode": "fast"}, "eval_mode"),
    ],
)
def test_config_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


class _Recorder(Hook):
    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float, float]] = []

    def on_step_end(self, state) -> None:
        tau = {b.tau for _, b in dynamic_blocks(state.model)}
        assert len(tau) == 1
        self.rows.append((state.step - 1, state.step_log["tau"], state.step_log["budget"], tau.pop()))


def test_fit_applies_tau_and_budget_schedules() -> None:
    torch.manual_seed(0)
    loaders = build_loaders("synthetic", batch_size=32, subset=128, in_channels=1, image_size=12, num_train=160)
    model = dynnet.create_model("cifar_resnet8", recipe="convnet_aig", width=0.25, in_channels=1)
    rec = _Recorder()
    config = TrainConfig(
        epochs=2, lr=0.01, tau_start=4.0, tau_end=0.5, budget=0.4, budget_start=1.0, budget_warmup_epochs=1.0
    )
    fit(model, loaders.train, config, hooks=[rec])
    steps_per_epoch = len(loaders.train)
    total = 2 * steps_per_epoch
    assert [r[0] for r in rec.rows] == list(range(total))
    for step, tau, budget, block_tau in rec.rows:
        assert tau == pytest.approx(tau_at(step / total, 4.0, 0.5))
        assert block_tau == pytest.approx(tau)  # applied with dynnet.set_tau before the step
        assert budget == pytest.approx(budget_at(step / steps_per_epoch, 0.4, start=1.0, warmup_epochs=1.0))
    assert rec.rows[-1][2] == pytest.approx(0.4)
