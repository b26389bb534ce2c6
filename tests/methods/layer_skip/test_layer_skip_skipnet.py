"""SkipNet: the three gate designs, explicit LSTM state, hybrid training phases, real skipping."""

import pytest
import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.methods.layer_skip.skipnet import GATES
from dynnet.testing import assert_decisions_mixed, diverse_inputs, scramble_gates, scramble_until_mixed

BLOCKS = ["layer1.0", "layer2.0", "layer3.0"]


def _model(gate: str = "rnn", **kw: object) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe="skipnet", gate=gate, in_channels=1, width=0.5, **kw)


def _x(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("gate", GATES)
def test_scrambled_gates_skip_some_blocks_for_some_inputs(gate: str) -> None:
    """The conformance suite's scrambling must give SkipNet decisions that depend on the input: with random ``N(0, 1)``
    biases every gate of the RNN design was on (or every one off) for every input at almost every seed, and sparse ==
    masked compared two dense runs."""
    model = _model(gate).eval()
    x = diverse_inputs(8, (1, 16, 16))
    mixed = 0
    for seed in range(8):
        scramble_gates(model, seed=seed)
        with torch.no_grad(), dynnet.trace() as t:
            model(x)
        hard = torch.stack([d.hard for d in t.decisions.values()], 1)  # Tensor[N, blocks]
        mixed += 0 < float(hard.mean()) < 1 and not bool((hard == hard[:1]).all())
    assert mixed >= 5, f"{gate}: only {mixed} of 8 scramblings gave decisions that differ across inputs"


@pytest.mark.parametrize("gate", GATES)
def test_sparse_equals_masked_and_executes_exactly(gate: str) -> None:
    model = _model(gate).eval()
    x = diverse_inputs(8, (1, 16, 16))
    scramble_until_mixed(model, x)
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    assert_decisions_mixed(tm, "skipnet")
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as c:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ts.macs(), tm.macs())
    assert ts.executed_macs().sum().item() == c.total
    torch.testing.assert_close(ts.executed_macs(), ts.macs())
    assert list(ts.decisions) == BLOCKS


def test_lstm_state_flows_between_blocks_and_is_not_stored() -> None:
    model = _model("rnn").eval()
    scramble_gates(model, seed=1, scale=3.0)
    before = dict(model.named_buffers())
    x = _x()
    with torch.no_grad(), dynnet.trace():
        model(x)
    assert dict(model.named_buffers()).keys() == before.keys()
    assert not [k for k, v in vars(model.gates).items() if isinstance(v, torch.Tensor)]
    # the third gate depends on the first block's input through the LSTM state: perturbing only the
    # first projection changes the last decision's probability
    with torch.no_grad(), dynnet.trace() as t1:
        model(x)
        model.gates.proj[0].weight.add_(1.0)
    with torch.no_grad(), dynnet.trace() as t2:
        model(x)
    assert not torch.allclose(t1.decisions["layer3.0"].soft, t2.decisions["layer3.0"].soft)


def test_dense_mode_evaluates_no_gate() -> None:
    model = _model("ffgate1").eval()
    base = dynnet.create_model("cifar_resnet8", in_channels=1, width=0.5).eval()
    x = _x(2)
    with torch.no_grad(), MacCounter() as c_base:
        base(x)
    dynnet.set_mode(model, "dense")
    with torch.no_grad(), MacCounter() as c:
        model(x)
    assert c.total == c_base.total


def test_supervised_phase_is_straight_through_sigmoid() -> None:
    model = _model().train()
    x, y = _x(), torch.arange(8) % 10
    with dynnet.trace() as t:
        logits = model(x)
    for d in t.decisions.values():
        assert torch.equal(d.hard.detach(), (d.soft > 0.5).float())
    loss = model.compute_loss(logits, y, t)
    assert set(loss.parts) == {"task", "budget"}
    loss.total.backward()
    assert model.gates.out.bias.grad.abs().sum() > 0


def test_reinforce_phase_samples_and_uses_the_reward() -> None:
    model = _model(alpha=0.5, budget=0.5).train()
    model.set_phase("reinforce")
    with torch.no_grad():
        model.gates.out.bias.fill_(0.0)  # p = 0.5: sampled decisions are mixed
    x, y = _x(32, seed=2), torch.arange(32) % 10
    with dynnet.trace() as t:
        logits = model(x)
    hard = torch.stack([d.hard for d in t.decisions.values()], 1)
    assert 0 < hard.mean() < 1 and hard.grad_fn is None  # sampled, no straight-through
    loss = model.compute_loss(logits, y, t)
    assert {"task", "reinforce", "reward"} <= set(loss.parts)
    ce = torch.nn.functional.cross_entropy(logits.detach(), y, reduction="none").double()
    over = (t.macs().detach() / t.dense_macs() - 0.5).clamp(min=0)  # only the MACs above the budget are charged
    assert 0 < over.count_nonzero() < 32
    expected_reward = (-ce - 0.5 * over).mean()
    assert loss.parts["reward"] == pytest.approx(expected_reward.item())
    assert model.reward_baseline.item() == pytest.approx(expected_reward.item())  # first batch initialises it
    loss.total.backward()
    assert model.gates.out.bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="phase"):
        model.set_phase("rl")


def test_rnn_gate_inference_step_equals_the_training_step() -> None:
    """Eval runs the LSTM gate as sum → addmm → fused lstm_cell → addmm; it must compute what training computes."""
    model = _model("rnn")
    scramble_gates(model, seed=2, scale=2.0)
    gates = model.gates
    x, h, c = torch.randn(5, 8, 6, 6), torch.randn(5, 10), torch.randn(5, 10)
    with torch.no_grad(), MacCounter() as train_macs:
        expected = gates.train()._step(1, x, h, c)
    with torch.no_grad(), MacCounter() as eval_macs:
        got = gates.eval()._step(1, x, h, c)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert eval_macs.total == train_macs.total


def test_budget_below_what_the_feed_forward_gates_cost_is_refused() -> None:
    with pytest.raises(ValueError, match="reach"):
        _model("ffgate1", budget=0.2)
    _model("ffgate2", budget=0.2)
    _model("rnn", budget=0.1)


@pytest.mark.parametrize("gate", ["rnn", "ffgate1"])
def test_calibration_moves_every_gate_and_round_trips(gate: str) -> None:
    model = _model(gate).eval()
    scramble_gates(model, seed=4, scale=2.0)
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.2, 3, 64).view(
        -1, 1, 1, 1
    )
    report = dynnet.calibrate(model, x, 0.6, tolerance=0.04)
    assert report.within_tolerance and report.thresholds["gate logit offset"] != 0
    other = _model(gate)
    other.load_state_dict(model.state_dict())
    dynnet.sparse(other.eval())
    with torch.no_grad(), dynnet.trace() as t:
        other(x)
    assert float(t.mac_fraction().mean()) == pytest.approx(report.mac_fraction, abs=1e-9)
