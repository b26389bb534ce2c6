"""ACT over the blocks of each stage: halting rule, real early stopping, ponder cost, mean-field gradient."""

import pytest
import torch

import dynnet
from dynnet.estimators.ponder import act_weights
from dynnet.macs import MacCounter
from dynnet.testing import scramble_gates


def _model(**kw: object) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet20", recipe="act", in_channels=1, width=0.5, **kw).eval()


def _x(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def test_halting_after_the_first_block_skips_the_rest_of_the_stage() -> None:
    model = _model()
    stage = model.net.layer2
    with torch.no_grad():
        stage.halting[0].fc.bias.fill_(6.0)  # h ≈ 0.9975 >= 1 - eps: halt after block 0
    x = torch.randn(4, 8, 16, 16)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t, MacCounter(stage) as c:
        out = stage(x)
    torch.testing.assert_close(out, stage.unit(0)(x))
    assert c.by_module().get("1", 0) == 0 and c.by_module().get("2", 0) == 0
    assert t.decisions["layer2/unit1"].hard.sum() == 0
    torch.testing.assert_close(t.outputs["layer2/ponder"], torch.full((4,), 1.0 + 1.0))  # N = 1, R = 1


def test_sparse_equals_masked_and_counts_exactly() -> None:
    model = _model()
    scramble_gates(model, seed=1, scale=1.0)
    x = _x()
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as c:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ts.macs(), tm.macs())
    assert ts.executed_macs().sum().item() == c.total
    assert ts.executed_macs().sum() < tm.executed_macs().sum()  # halted samples left the batch
    rates = torch.stack([d.hard.mean() for d in ts.decisions.values()])
    assert 0 < rates.mean() < 1


def test_ponder_cost_enters_the_loss_and_halting_gets_the_mean_field_gradient() -> None:
    model = _model(ponder_weight=0.1).train()
    stage = model.net.layer1
    x = torch.randn(6, 8, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for unit in stage.halting:
            unit.fc.bias.fill_(-1.0)
    with dynnet.trace() as t:
        y = stage(x)
    assert "ponder" in t.losses
    w = torch.randn_like(y)
    (y * w).sum().backward()
    grad = stage.halting[0].fc.bias.grad.clone()
    # oracle: the mean-field output sum_n p_n x_n with Graves's weights
    stage.zero_grad()
    with torch.no_grad():
        states = [stage.unit(0)(x)]
        states += [stage.unit(1)(states[-1])]
        states += [stage.unit(2)(states[-1])]
    h = torch.stack([stage.halting[i](states[i]) for i in range(2)] + [torch.ones(6)], 1)
    act = act_weights(h)
    mean_field = sum(act.weights[:, i].view(-1, 1, 1, 1) * s for i, s in enumerate(states))
    (mean_field * w).sum().backward()
    torch.testing.assert_close(grad, stage.halting[0].fc.bias.grad, rtol=1e-4, atol=1e-5)


def test_needs_stages_of_two_blocks() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        dynnet.create_model("cifar_resnet8", recipe="act")


def test_loads_the_base_networks_weights() -> None:
    torch.manual_seed(1)
    base = dynnet.create_model("cifar_resnet20", in_channels=1, width=0.5).eval()
    model = _model()
    model.load_base_state_dict(base.state_dict())
    x = _x(4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))


def test_mac_budget_loss_reaches_the_halting_units() -> None:
    model = _model(budget=0.5, ponder_weight=0.0).train()
    x, y = _x(6), torch.arange(6)
    with dynnet.trace() as t:
        logits = model(x)
    loss = model.compute_loss(logits, y, t)
    assert "budget" in loss.parts and "ponder" not in loss.parts
    model.zero_grad()
    t.budget_loss(0.5).backward()
    for stage in (model.net.layer1, model.net.layer2, model.net.layer3):
        assert (stage.halting[0].fc.bias.grad < 0).all()  # descent raises h: halt earlier, spend less


def test_halting_knob_moves_the_mac_fraction_monotonically_and_round_trips() -> None:
    model = _model()
    scramble_gates(model, seed=1, scale=1.0)
    dynnet.sparse(model)
    x = _x(16)
    knob = model.budget_knob()
    fractions = []
    for value in (-30.0, -1.0, 0.0, 1.0, 30.0):
        knob.set(value)
        with torch.no_grad(), dynnet.trace() as t:
            model(x)
        fractions.append(float(t.mac_fraction().mean()))
    assert fractions == sorted(fractions) and fractions[0] < 0.5 and fractions[-1] >= 1.0
    knob.set(-1.0)
    other = _model()
    other.load_state_dict(model.state_dict())
    dynnet.sparse(other)
    assert other.budget_knob().get() == -1.0
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
