"""HydraNets: branch selection, class-subset relevance, zero branch, sparse branches == masked average, exact MACs."""

import pytest
import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.methods.moe.hydranets import branch_relevance, select_branches
from dynnet.testing import scramble_gates


def test_select_branches_threshold_top_k_and_best() -> None:
    prob = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.2, 0.3, 0.1, 0.4], [0.6, 0.1, 0.55, 0.9]])
    chosen = select_branches(prob, k=2, threshold=0.5)
    expected = [[True, True, False, False], [False, False, False, True], [True, False, False, True]]
    assert chosen.tolist() == expected


def test_branch_relevance_round_robin() -> None:
    rel = branch_relevance(torch.tensor([0, 5, 7]), 4)
    assert rel.argmax(1).tolist() == [0, 1, 3] and rel.sum().item() == 3


def test_sparse_branches_equal_masked_and_macs_are_exact() -> None:
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="hydranets", in_channels=1, stages=1)
    scramble_gates(model, seed=2, scale=3.0)
    model.eval()
    with torch.no_grad():
        model.net.layer3.gate.fc2.bias[-1] = -30.0  # the zero branch never wins here (tested below)
    x = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), dynnet.trace() as t0:
        model(x)
    second = t0.decisions["layer3"].soft[:, :4].topk(2, 1).values[:, 1]
    model.net.layer3.threshold = float(second.median())  # about half the samples take a second branch
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    used = tm.decisions["layer3"].hard[:, :4].sum(1)
    assert set(used.tolist()) == {1.0, 2.0}
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as counter:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-5)
    assert counter.total == pytest.approx(float(ts.executed_macs().sum()), abs=0.5)
    # layer3 of cifar_resnet8 on a 16x16 input: 32->64 stride 2 conv (4x4 out), 64->64 conv, 1x1 projection.
    branch = 32 * 64 * 9 * 16 + 64 * 64 * 9 * 16 + 32 * 64 * 16
    entry = next(e for e in ts.entries if e.name == "layer3/branches")
    torch.testing.assert_close(entry.executed, used.double() * branch)


def test_gate_loss_trains_the_gate() -> None:
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="hydranets", in_channels=1).train()
    x, y = torch.randn(6, 1, 16, 16), torch.arange(6)
    with dynnet.trace() as t:
        logits = model(x)
    out = model.compute_loss(logits, y, t)
    out.total.backward()
    assert "gate" in out.parts and model.net.layer3.gate.fc2.weight.grad.abs().sum() > 0


def test_zero_branch_runs_the_shortcuts_only() -> None:
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="hydranets", in_channels=1).eval()
    assert [n for n, _ in model.blocks()] == ["net.layer2", "net.layer3"]  # stages=2 by default
    stage = model.net.layer3
    x = torch.randn(6, 32, 8, 8).relu()
    before = x.clone()
    block = getattr(stage, "0")
    with torch.no_grad():
        stage.gate.fc2.bias[-1] = 30.0  # the zero branch beats every real branch
        expected = block.relu(block.downsample(x))  # one block: projection shortcut + ReLU
    for mode in ("masked", "sparse"):
        dynnet.set_mode(model, mode)
        with torch.no_grad(), dynnet.trace() as t, MacCounter(stage) as c:
            out = stage(x)
        torch.testing.assert_close(out, expected)
        assert (t.decisions["layer3"].hard[:, -1] == 1).all() and t.decisions["layer3"].hard[:, :-1].sum() == 0
        projection = 32 * 64 * 4 * 4
        entry = next(e for e in t.entries if e.name == "layer3/zero_branch")
        torch.testing.assert_close(entry.macs, torch.full((6,), float(projection), dtype=torch.float64))
        assert next(e for e in t.entries if e.name == "layer3/branches").macs.sum() == 0
        if mode == "sparse":
            assert c.total == pytest.approx(float(t.executed_macs().sum()), abs=0.5)
    torch.testing.assert_close(x, before, rtol=0, atol=0)


def test_budget_loss_reaches_the_gates_and_the_knob_is_monotone() -> None:
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="hydranets", in_channels=1, budget=0.5).train()
    x, y = torch.randn(6, 1, 16, 16), torch.arange(6)
    with dynnet.trace() as t:
        logits = model(x)
    out = model.compute_loss(logits, y, t)
    assert out.parts["budget"] > 0  # a fresh model runs two branches per stage: far above 0.5
    model.zero_grad()
    t.budget_loss(0.5).backward()
    bias_grad = model.net.layer2.gate.fc2.bias.grad
    assert (bias_grad[:-1] > 0).all() and bias_grad[-1] < 0  # descent: real branches down, the zero branch up
    model.eval()
    scramble_gates(model, seed=1)
    dynnet.sparse(model)
    knob = model.budget_knob()
    fractions = []
    for value in (-30.0, -1.0, 0.0, 1.0, 30.0):
        knob.set(value)
        with torch.no_grad(), dynnet.trace() as t:
            model(x)
        fractions.append(float(t.mac_fraction().mean()))
    assert fractions == sorted(fractions) and fractions[0] < 0.5 < 1.0 < fractions[-1]
