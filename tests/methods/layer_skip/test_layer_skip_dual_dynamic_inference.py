"""Dual Dynamic Inference: skip gates plus anytime exits under a hard per-sample MAC budget."""

import pytest
import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.testing import scramble_gates


def _model() -> dynnet.DynamicModel:
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="dual_dynamic_inference", in_channels=1, width=0.5).eval()
    scramble_gates(model, seed=5, scale=2.0)
    return model


def _x(n: int = 12) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_budget_is_respected_and_sparse_equals_masked(fraction: float) -> None:
    model = _model()
    model.set_resource_budget(fraction)
    x = _x()
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as c:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ts.macs(), tm.macs())
    assert ts.executed_macs().sum().item() == c.total
    # the first exit is always reached; gates are not part of the worst-case rule (a few MACs on top)
    costs = model.costs(x)
    gates = sum(e.maximum for e in ts.entries if e.name.endswith("/gate"))
    first_exit = costs.stem + costs.stages[0] + costs.exits[0]
    assert (ts.macs() <= max(fraction * ts.dense_macs(), first_exit) + gates + 0.5).all()
    assert ts.macs().min() < ts.dense_macs()


def test_exits_follow_the_budget() -> None:
    model = _model()
    x = _x()
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    assert not t.decisions_of("exit")  # no budget: no exit
    model.set_resource_budget(0.05)  # below the first exit's reach: everyone leaves at exit 0
    with torch.no_grad(), dynnet.trace() as t, MacCounter(model) as c:
        out = model(x)
    assert t.decisions["exit0"].hard.sum() == x.shape[0]
    torch.testing.assert_close(out, model.exits[0].classify(model._prefix(0, x)))
    assert c.by_module().get("net.layer2", 0) == 0 and c.by_module().get("net.fc", 0) == 0


def test_training_loss_supervises_every_exit() -> None:
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="dual_dynamic_inference", in_channels=1, width=0.5).train()
    x, y = _x(8), torch.arange(8) % 10
    with dynnet.trace() as t:
        logits = model(x)
    assert {"exit0", "exit1"} <= set(t.outputs)
    loss = model.compute_loss(logits, y, t)
    loss.total.backward()
    assert model.exits[1].fc.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        model.set_resource_budget(0.0)


def test_calibration_moves_the_skip_gates_with_the_exits_in_effect() -> None:
    model = _model()
    model.set_resource_budget(0.8)
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.2, 3, 64).view(
        -1, 1, 1, 1
    )
    exits = [e.fc.bias.clone() for e in model.exits]
    report = dynnet.calibrate(model, x, 0.5, tolerance=0.04)
    assert report.within_tolerance, report.summary()
    for head, before in zip(model.exits, exits, strict=True):  # the exit classifiers are not decisions to shift
        torch.testing.assert_close(head.fc.bias, before)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    assert t.decisions_of("exit") and float(t.mac_fraction().mean()) == pytest.approx(report.mac_fraction)
