"""Visual attention LSTM: soft attention over locations, the doubly stochastic regulariser, ACT halting that
removes samples from the batch, exact per-step MACs."""

import math

import pytest
import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.methods.glimpse.visual_attention_action import (
    attention_entropy,
    doubly_stochastic_penalty,
    shift_frame,
)
from dynnet.testing import diverse_inputs, scramble_until_mixed

NAME = "visual_attention_action"


def _create(**kw: object) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe=NAME, in_channels=1, **kw).eval()


def _x(n: int) -> torch.Tensor:
    return torch.randn((n, 1, 32, 32), generator=torch.Generator().manual_seed(3))


def _mixed_halting(model: dynnet.DynamicModel, x: torch.Tensor) -> None:
    """Random halting units (successive seeds) until samples of ``x`` stop after different numbers of steps."""
    scramble_until_mixed(model, x)


# -- pure functions -----------------------------------------------------------------------------------
def test_doubly_stochastic_penalty_is_zero_when_every_location_totals_one() -> None:
    locations = 16
    uniform = torch.full((2, locations, locations), 1.0 / locations)  # T = L steps of uniform attention
    one_each = torch.eye(locations)[torch.randperm(locations)].unsqueeze(0)  # each location once
    torch.testing.assert_close(doubly_stochastic_penalty(uniform), torch.zeros(2))
    torch.testing.assert_close(doubly_stochastic_penalty(one_each), torch.zeros(1))
    # All attention on one location at every step: (1 - T)^2 there, 1 at each of the L - 1 others.
    stuck = torch.zeros(1, 4, locations)
    stuck[:, :, 0] = 1.0
    torch.testing.assert_close(doubly_stochastic_penalty(stuck), torch.tensor([9.0 + locations - 1]))
    # Fewer steps than locations: the minimum is uniform attention, L (1 - T / L)^2.
    torch.testing.assert_close(doubly_stochastic_penalty(uniform[:, :4]), torch.full((2,), locations * 0.75**2))


def test_doubly_stochastic_penalty_counts_only_the_steps_taken() -> None:
    a = torch.softmax(torch.randn(3, 4, 9, generator=torch.Generator().manual_seed(0)), -1)
    taken = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    expected = torch.stack([doubly_stochastic_penalty(a[i : i + 1, : int(k)])[0] for i, k in enumerate(taken.sum(1))])
    torch.testing.assert_close(doubly_stochastic_penalty(a, taken), expected)


def test_attention_entropy_uniform_and_one_hot() -> None:
    torch.testing.assert_close(attention_entropy(torch.full((5,), 0.2)), torch.tensor(math.log(5)))
    torch.testing.assert_close(attention_entropy(torch.eye(5)), torch.zeros(5))


def test_frames_are_deterministic_zero_filled_translations() -> None:
    x = torch.arange(36.0).view(1, 1, 6, 6)
    assert shift_frame(x, 0, 2) is x
    right = shift_frame(x, 1, 2)  # direction (1, 0): content moves 2 pixels right
    torch.testing.assert_close(right[..., 2:], x[..., :-2])
    assert (right[..., :2] == 0).all()
    down = shift_frame(x, 2, 1)  # direction (0, 1)
    torch.testing.assert_close(down[..., 1:, :], x[..., :-1, :])
    assert shift_frame(x, 10, 1).abs().sum() < x.abs().sum()  # second cycle: twice the shift
    assert shift_frame(x, 3, 0) is x


# -- the model ----------------------------------------------------------------------------------------
def test_attention_is_a_distribution_over_locations_computed_from_the_previous_state() -> None:
    model = _create(grid=4, max_steps=3)
    x = _x(5)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    att = t.outputs[f"{NAME}/attention"]
    assert att.shape == (5, 3, 16)
    torch.testing.assert_close(att.sum(-1), torch.ones(5, 3))
    # Step 0's attention comes from the initial state, an MLP of frame 0's mean feature.
    body = model.net
    with torch.no_grad():
        feats = body.features(x)
        h0, _ = body.initial_state(feats)
        torch.testing.assert_close(h0, torch.tanh(body.init(feats.mean(2))).chunk(2, 1)[0])
        torch.testing.assert_close(att[:, 0], torch.softmax(body.core.attention(h0), 1))


def test_fresh_model_takes_every_step_and_matches_dense() -> None:
    model = _create(max_steps=4)
    x = _x(3)
    with torch.no_grad(), dynnet.trace() as t:
        y = model(x)
    assert (t.outputs[f"{NAME}/steps"] == 4).all()
    dynnet.set_mode(model, "dense")
    with torch.no_grad():
        torch.testing.assert_close(model(x), y)


def test_everyone_halting_after_one_step_runs_the_cnn_once() -> None:
    model = _create(max_steps=4)
    with torch.no_grad():
        model.net.halting.bias.fill_(8.0)  # h ~ 1: stop after the first step
    dynnet.sparse(model)
    x = _x(4)
    with torch.no_grad(), dynnet.trace() as t, MacCounter() as counter:
        y = model(x)
    trunk, init, step, halting = model.net._costs(x)
    assert counter.total == 4 * (trunk + init + step + halting)
    torch.testing.assert_close(t.executed_macs(), torch.full((4,), float(trunk + init + step + halting)).double())
    assert (t.outputs[f"{NAME}/steps"] == 1).all()
    with torch.no_grad():  # the prediction is step 0's
        feats = model.net.features(x)
        h, c = model.net.initial_state(feats)
        torch.testing.assert_close(y, model.net.core(feats, h, c)[2])


@pytest.mark.parametrize("frame_shift", [2, 0])
def test_samples_that_halt_leave_the_batch(frame_shift: int) -> None:
    model = _create(max_steps=4, frame_shift=frame_shift)
    x = _x(8)
    _mixed_halting(model, x)
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    steps = tm.outputs[f"{NAME}/steps"]
    assert len(steps.unique()) > 1, "the test needs samples that stop after different numbers of steps"
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as counter:
        sparse_out = model(x)
    torch.testing.assert_close(sparse_out, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ts.outputs[f"{NAME}/steps"], steps)
    # The prediction is the average of the step predictions up to the halting step (the paper's video average).
    step_logits = torch.stack([tm.outputs[f"{NAME}/logits{t}"] for t in range(4)], 1)
    average = torch.stack([step_logits[i, : int(s)].mean(0) for i, s in enumerate(steps)])
    torch.testing.assert_close(sparse_out, average, rtol=1e-5, atol=1e-5)
    # Per sample: the first frame, the initial state, one LSTM step per step taken, a new frame for every later
    # step when frames move, and a halting unit after every step taken but the last possible one.
    trunk, init, step, halting = model.net._costs(x)
    s = steps.double()
    expected = trunk + init + s * step + (s - 1) * (trunk if frame_shift else 0) + s.clamp(max=3) * halting
    torch.testing.assert_close(ts.executed_macs(), expected)
    torch.testing.assert_close(ts.macs(), tm.macs())
    assert counter.total == pytest.approx(float(expected.sum()), abs=0.5)
    assert float(expected.sum()) < 8 * float(tm.executed_macs()[0])  # fewer MACs than running every step


def test_objective_has_the_papers_terms_and_reaches_every_part() -> None:
    model = _create(max_steps=3).train()
    x, y = _x(6), torch.arange(6)
    with dynnet.trace() as t:
        logits = model(x)
    out = model.compute_loss(logits, y, t)
    assert set(out.parts) == {"task", "steps", "attention", "ponder", "budget"}
    reg = doubly_stochastic_penalty(t.outputs[f"{NAME}/attention"], t.outputs[f"{NAME}/taken"]).mean()
    assert out.parts["attention"] == pytest.approx(float(reg.detach()))
    out.total.backward()
    body = model.net
    for m in (body.halting, body.core.attention, body.init, body.core.input, body.trunk.conv1):
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0


def test_the_budget_loss_reaches_the_halting_unit_through_the_steps_taken() -> None:
    """The MAC-budget loss alone (every other term off) gets a gradient on the halting unit through the
    straight-through "step ran" indicators; over budget it pushes the halting probability up (halt sooner)."""
    model = _create(max_steps=3, step_weight=0.0, attention_weight=0.0, ponder_weight=0.0).train()
    x, y = _x(6), torch.arange(6)
    with dynnet.trace() as t:
        logits = model(x)
    fraction = float(t.mac_fraction().mean().detach())
    assert fraction == pytest.approx(1.0, abs=1e-3)  # a fresh model takes every step (+ the halting units)
    budget = model.compute_loss(logits, y, t, budget=0.5).parts["budget"]
    assert budget == pytest.approx((fraction - 0.5) ** 2, rel=1e-6)
    with dynnet.trace() as t:
        logits = model(x)
    out = model.compute_loss(logits, y, t, budget=0.5)
    (out.total - torch.nn.functional.cross_entropy(logits, y)).backward()
    assert float(model.net.halting.bias.grad) < 0  # gradient descent raises the halting logit


def test_calibration_offset_lives_in_the_halting_bias() -> None:
    model = _create(max_steps=4).eval()
    x = diverse_inputs(32, (1, 32, 32), seed=1)
    _mixed_halting(model, x)
    before = model.net.halting.bias.clone()
    report = dynnet.calibrate(model, x, 0.6, tolerance=0.05)
    assert report.within_tolerance
    torch.testing.assert_close(model.net.halting.bias, before - model.calibration[0].float())
