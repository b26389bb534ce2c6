"""DT-RAM: curriculum, intermediate supervision, answers at the stop step, per-sample MACs, reward, calibration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dynnet
from dynnet.macs import MacCounter
from dynnet.methods.early_exit.calibration import calibrate_thresholds
from dynnet.methods.early_exit.dt_ram import DTRAM, DTRAMCurriculum
from dynnet.testing import scramble_until_mixed
from dynnet.testing.scramble import randomise
from dynnet.train import FitState, Hook, TrainConfig, fit

STEPS = 4


def _model(**kw: object) -> DTRAM:
    torch.manual_seed(0)
    kw.setdefault("max_glimpses", STEPS)
    return dynnet.create_model("cifar_resnet8", recipe="dt_ram", in_channels=1, **kw).eval()


def _x(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn((n, 1, 32, 32), generator=torch.Generator().manual_seed(seed))


def _force_stop(model: DTRAM, logit: float) -> None:
    with torch.no_grad():
        model.net.halting.weight.zero_()
        model.net.halting.bias.fill_(logit)


# -- curriculum ---------------------------------------------------------------------------------------------------
def test_curriculum_hook_disables_then_enables_stopping() -> None:
    model = _model(fixed_fraction=0.5)
    _force_stop(model, 30.0)  # P(stop) = 1 whenever the stop action acts
    hook = DTRAMCurriculum()
    state = FitState(config=TrainConfig(), model=model, optimizer=None, scheduler=None, total_steps=10)
    seen = []
    hook.on_fit_start(state)
    for step in range(10):
        seen.append(model.stopping)
        with torch.no_grad(), dynnet.trace() as t:
            model.train()(_x(3))
        assert (t.outputs["ram/glimpses"] == (1 if model.stopping else STEPS)).all()
        state.step = step + 1
        hook.on_step_end(state)
    assert seen == [False] * 5 + [True] * 5
    hook.on_fit_end(state)
    assert model.stopping


def test_curriculum_runs_inside_fit() -> None:
    model = _model(fixed_fraction=0.5)
    data = TensorDataset(_x(16), torch.arange(16) % 10)

    class Spy(Hook):
        def __init__(self) -> None:
            self.stopping: list[bool] = []

        def on_step_end(self, state: FitState) -> None:
            self.stopping.append(state.model.stopping)

    spy = Spy()
    config = TrainConfig(epochs=1, lr=0.01, max_steps=4)
    fit(model, DataLoader(data, batch_size=4), config, hooks=[DTRAMCurriculum(), spy])
    # the spy runs after the curriculum: the flag it reads is the one set for the next step
    assert spy.stopping == [False, True, True, True]
    assert model.stopping


def test_without_stopping_the_halting_policy_gets_no_gradient() -> None:
    model = _model()
    model.stopping = False
    x, y = _x(4), torch.arange(4)
    with dynnet.trace() as t:
        logits = model.train()(x)
    model.compute_loss(logits, y, t).total.backward()
    assert model.net.halting.weight.grad is None
    assert model.net.policy.weight.grad is not None


# -- intermediate supervision -------------------------------------------------------------------------------------
def test_intermediate_supervision_covers_every_step() -> None:
    model = _model()
    model.stopping = False
    x, y = _x(5), torch.tensor([0, 1, 2, 3, 4])
    with dynnet.trace() as t:
        logits = model.train()(x)
    per_step, looked = model.step_logits(logits, t)
    assert per_step.shape == (5, STEPS, 10) and looked.all()
    expected = torch.stack([F.cross_entropy(per_step[:, s], y) for s in range(STEPS)]).mean()
    torch.testing.assert_close(model.task_loss(logits, y, t), expected)
    # each step's read-out receives its own gradient
    grads = torch.autograd.grad(model.task_loss(logits, y, t), [t.outputs[f"dt_ram/logits{s}"] for s in range(3)])
    assert all(g.abs().sum() > 0 for g in grads)
    # the intermediate read-outs are recorded as training-only MACs (the static network has one classifier)
    extra = [e for e in t.entries if e.name.endswith("/classifier")]
    assert len(extra) == STEPS - 1 and all(e.dense == 0 for e in extra)


def test_intermediate_supervision_only_counts_the_steps_taken() -> None:
    model = _model()
    _force_stop(model, 30.0)  # every sample stops after its first glimpse
    x, y = _x(5), torch.tensor([0, 1, 2, 3, 4])
    with dynnet.trace() as t:
        logits = model.train()(x)
    _, looked = model.step_logits(logits, t)
    assert looked[:, 0].all() and not looked[:, 1:].any()
    torch.testing.assert_close(t.outputs["dt_ram/logits0"], logits)  # the answer is the first step's
    torch.testing.assert_close(model.task_loss(logits, y, t), F.cross_entropy(logits, y))


# -- answers and costs --------------------------------------------------------------------------------------------
def test_stopped_samples_answer_from_their_stop_step() -> None:
    model = _model()
    x = _x(12, seed=5)
    scramble_until_mixed(model, x)
    with torch.no_grad():
        _, per_step = model.net.step_outputs(x)
        for mode in ("masked", "sparse"):
            dynnet.set_mode(model, mode)
            with dynnet.trace() as t:
                out = model(x)
            stop = t.outputs["exit_index"]
            assert stop.unique().numel() > 1, "the scrambled stop policy should stop samples at different steps"
            torch.testing.assert_close(out, per_step[torch.arange(12), stop], rtol=1e-5, atol=1e-5)


def test_stopping_after_the_first_glimpse_costs_less() -> None:
    model = _model()
    randomise(model, torch.Generator().manual_seed(0))  # spread the stop probabilities
    x = _x(8)
    with torch.no_grad():
        p_stop, _ = model.net.step_outputs(x)
    # half of the samples stop after their first glimpse, the others never stop
    first = p_stop[:, 0].sort().values
    model.set_thresholds([float(first[3] + first[4]) / 2] + [math.inf] * (STEPS - 2))
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t, MacCounter() as counter:
        model(x)
    early = t.outputs["exit_index"] == 0
    assert 0 < int(early.sum()) < 8 and (t.outputs["exit_index"][~early] == STEPS - 1).all()
    costs = model.net.stop_costs(x)
    macs = t.macs()
    assert (macs[early] < macs[~early].min()).all()
    torch.testing.assert_close(macs[early], costs[0].expand(int(early.sum())))
    torch.testing.assert_close(macs[~early], costs[-1].expand(int((~early).sum())))
    assert costs[-1] == model.dense_macs(x)
    assert t.executed_macs().sum().item() == counter.total  # compaction: the stopped samples ran nothing more


# -- reward -------------------------------------------------------------------------------------------------------
def test_reward_charges_the_mac_fraction_above_the_budget() -> None:
    model = _model(step_cost=0.4, discount=0.9, budget=0.3)
    _force_stop(model, -30.0)  # nobody stops: every sample pays for every glimpse above the budget
    x, y = _x(4), torch.arange(4)
    with dynnet.trace() as t:
        logits = model.train()(x)
    correct = (logits.argmax(1) == y).float()
    torch.testing.assert_close(model.reward(logits, y, t), correct * 0.9 ** (STEPS - 1) - 0.4 * (1.0 - 0.3))
    # stopping after s glimpses costs the MAC fraction of those glimpses above the budget (the first is free here)
    costs = model.net.stop_costs(x)
    fractions = costs / costs[-1]
    assert float(fractions[0]) < 0.3 < float(fractions[1])
    for s in range(1, STEPS + 1):
        t.outputs["ram/glimpses"] = torch.full((4,), float(s))
        charge = 0.4 * max(0.0, float(fractions[s - 1]) - 0.3)
        torch.testing.assert_close(model.reward(logits, y, t), correct * 0.9 ** (s - 1) - charge)
    # the budget reaches the policy-gradient term of the objective
    t.outputs["ram/glimpses"] = torch.full((4,), float(STEPS))
    free = _model(step_cost=0.4, discount=0.9, budget=1.0)
    assert model.compute_loss(logits, y, t).parts["policy"] != free.compute_loss(logits, y, t).parts["policy"]


# -- budget calibration -------------------------------------------------------------------------------------------
def test_calibrated_thresholds_meet_the_budget_in_sparse_mode() -> None:
    model = _model(budget=0.6)
    x = _x(24, seed=7)
    scramble_until_mixed(model, x)
    loader = DataLoader(TensorDataset(x, torch.arange(24) % 10), batch_size=8)
    cal = model.calibrate(loader)
    assert cal.thresholds.shape == (STEPS - 1,)
    torch.testing.assert_close(model.thresholds, cal.thresholds)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    fraction = float(t.macs().mean()) / t.dense_macs()
    assert fraction == pytest.approx(cal.achieved_fraction, abs=1e-6)
    assert fraction == pytest.approx(0.6, abs=0.1)


def test_calibration_splits_stop_probabilities_that_round_to_one() -> None:
    model = _model(budget=0.6)
    x = _x(24, seed=7)
    randomise(model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.net.halting.bias.add_(60.0)  # a confident stop policy: every logit far above float32's 1.0
        logits, _ = model.net.step_outputs(x)
    assert (torch.sigmoid(logits) == 1.0).all()  # precondition: no threshold on P(stop) could split them
    assert logits[:, 0].unique().numel() == 24
    loader = DataLoader(TensorDataset(x, torch.arange(24) % 10), batch_size=8)
    cal = model.calibrate(loader, budget=0.6)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    stops = t.outputs["exit_index"]
    assert stops.unique().numel() > 1  # the images stop at different glimpses
    assert float(t.macs().mean()) / t.dense_macs() == pytest.approx(cal.achieved_fraction, abs=1e-6)
    assert cal.achieved_fraction == pytest.approx(0.6, abs=0.05)


def test_dynnet_calibrate_uses_the_budgeted_batch_thresholds() -> None:
    model = _model(budget=0.6)
    x = _x(24, seed=7)
    scramble_until_mixed(model, x)
    expected = calibrate_thresholds(model.exit_profile([x]), 0.6)
    report = dynnet.calibrate(model, x, tolerance=0.05)
    torch.testing.assert_close(model.thresholds, expected.thresholds)
    assert report.thresholds["exit profile p"] == pytest.approx(expected.p)
    assert report.mac_fraction == pytest.approx(expected.achieved_fraction, abs=1e-6)
    assert float(model.calibration[0]) == pytest.approx(expected.p)
    assert "net.thresholds" in model.state_dict()
    model.stopping = False
    with pytest.raises(ValueError, match="disabled"):
        dynnet.calibrate(model, x, 0.6)


def test_config_rejects_bad_settings() -> None:
    for bad in ({"discount": 0.0}, {"step_cost": -0.1}, {"fixed_fraction": 1.5}, {"max_glimpses": 1}, {"budget": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _model(**bad)
