"""Dynamic recursive network: controllers add recursions per input; sparse re-runs only those inputs."""

import itertools

import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.testing import scramble_gates

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
    scramble_gates(model, seed=0, scale=2.0)
    x = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter(model) as c:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ts.macs(), tm.macs())
    runs = 10 + sum(d.hard.sum().item() for d in ts.decisions.values())
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
