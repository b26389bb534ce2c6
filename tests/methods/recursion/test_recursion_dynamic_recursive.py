"""Dynamic recursive network: controllers choose 0 to 1 + R applications per input; sparse runs only those inputs."""

import itertools

import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.testing import diverse_inputs, scramble_gates

BODY = 2 * 8 * 8 * 9 * 256  # cifar_resnet8 width 0.5, layer1.0 on 1x16x16


def _model(**kw: object) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe="dynamic_recursive", in_channels=1, width=0.5, **kw).eval()


def test_only_identity_blocks_recurse() -> None:
    model = _model()
    names = [n for n, _ in model.blocks()]
    assert names == ["net.layer1.0"]


def test_forced_recursion_applies_the_block_again() -> None:
    model = _model(max_recursions=2)
    block = model.net.layer1[0]
    with torch.no_grad():
        for c in block.controller:
            c.fc2.bias.copy_(torch.tensor([-6.0, 6.0]))  # always recurse
    x = torch.randn(3, 8, 16, 16)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t, MacCounter() as c:
        out = block(x)
    with torch.no_grad():
        expected = block.apply_block(block.apply_block(block.apply_block(x)))
    torch.testing.assert_close(out, expected)
    assert c.total == t.executed_macs().sum().item()
    torch.testing.assert_close(
        sum(e.macs for e in t.entries if "recursion" in e.name or e.name.endswith("/block")),
        torch.full((3,), 3.0 * BODY, dtype=torch.float64),
    )


def test_sparse_recurses_only_the_chosen_samples() -> None:
    model = _model(max_recursions=3)
    scramble_gates(model, seed=3, scale=2.0)
    with torch.no_grad():
        for c in model.net.layer1[0].controller:
            c.fc2.bias.zero_()  # decisions from the input alone: mixed across these inputs
    x = diverse_inputs(10, (1, 16, 16), seed=3)
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter(model) as c:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ts.macs(), tm.macs())
    runs = sum(d.hard.sum().item() for d in ts.decisions.values())  # the first application is decided too
    assert 0 < ts.decisions["layer1.0/block"].hard.sum() < 10 and ts.decisions["layer1.0/recursion2"].hard.sum() > 0
    conv = c.by_module()["net.layer1.0.conv1"] + c.by_module()["net.layer1.0.conv2"]
    assert conv == runs * BODY
    alive = [d.hard for d in ts.decisions.values()]
    assert all(bool((later <= earlier).all()) for earlier, later in itertools.pairwise(alive))  # stopping is final


def test_budget_loss_trains_the_controllers() -> None:
    model = _model(budget=0.9).train()
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8) % 10
    with dynnet.trace() as t:
        logits = model(x)
    loss = model.compute_loss(logits, y, t)
    assert "budget" in loss.parts
    loss.total.backward()
    assert model.net.layer1[0].controller[0].fc2.weight.grad.abs().sum() > 0


def test_closed_first_controller_skips_the_block() -> None:
    model = _model()
    block = model.net.layer1[0]
    with torch.no_grad():
        block.controller[0].fc2.bias.copy_(torch.tensor([6.0, -6.0]))  # never apply
    x = torch.randn(4, 8, 16, 16).relu()
    before = x.clone()
    for mode in ("masked", "sparse"):
        dynnet.set_mode(model, mode)
        with torch.no_grad(), dynnet.trace() as t, MacCounter(block) as c:
            out = block(x)
        torch.testing.assert_close(out, x, rtol=0, atol=0)  # post(shortcut(x)) = relu(x) = x
        assert t.decisions["layer1.0/block"].hard.sum() == 0
        assert (t.macs() == sum(e.maximum for e in t.entries if e.name.endswith("controller0"))).all()
        if mode == "sparse":
            assert c.total == t.executed_macs().sum().item()
    torch.testing.assert_close(x, before, rtol=0, atol=0)  # the input is never edited in place


def test_budget_knob_moves_the_applications_monotonically() -> None:
    model = _model(max_recursions=2)
    scramble_gates(model, seed=0, scale=2.0)
    dynnet.sparse(model)
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    knob = model.budget_knob()
    fractions = []
    for value in (-30.0, -1.0, 0.0, 1.0, 30.0):
        knob.set(value)
        with torch.no_grad(), dynnet.trace() as t:
            model(x)
        fractions.append(float(t.mac_fraction().mean()))
    assert fractions == sorted(fractions) and fractions[0] < 1.0 < fractions[-1]
    knob.set(0.0)
    assert float(model.calibration[0]) == 0.0
