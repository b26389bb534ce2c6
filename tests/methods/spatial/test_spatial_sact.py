"""SACT: per-position ACT against Graves's weights, halted positions really skipped, ponder gradient."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.estimators.ponder import act_weights
from dynnet.macs import MacCounter
from dynnet.methods.spatial.sact import SACTStage, act_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_act_step_matches_graves_weights_per_position() -> None:
    g = torch.Generator().manual_seed(0)
    n, c, h, w, blocks = 2, 3, 4, 5, 4
    hs = torch.rand(blocks - 1, n, h, w, generator=g) * 0.7
    xs = torch.randn(blocks, n, c, h, w, generator=g)
    state = None
    for i in range(blocks):
        state = act_step(state, xs[i], hs[i] if i < blocks - 1 else None, eps=0.01)
    # Oracle: the recursion package's act_weights on each position's sequence of halting scores.
    flat = torch.cat([hs, torch.ones(1, n, h, w)]).permute(1, 2, 3, 0).reshape(-1, blocks)
    ref = act_weights(flat, eps=0.01)
    expected = (ref.weights.view(n, h, w, blocks).permute(3, 0, 1, 2).unsqueeze(2) * xs).sum(0)
    torch.testing.assert_close(state.output, expected)
    torch.testing.assert_close(state.steps.reshape(-1), ref.steps.float())
    torch.testing.assert_close(state.remainder.reshape(-1), ref.remainder)
    assert not state.running.any()


def _model():
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet20", recipe="sact", in_channels=1)


def test_halted_positions_are_not_computed() -> None:
    model = _model().eval()
    stage = model.net.layer1
    assert isinstance(stage, SACTStage)
    with torch.no_grad():  # halt everywhere after the first block
        stage.gates[0].conv.bias.fill_(20.0)
    dynnet.sparse(model)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad(), dynnet.trace() as t, MacCounter() as counter:
        out = stage(x)
    first = stage._blocks[0]
    with torch.no_grad():
        torch.testing.assert_close(out, first(x))  # p_1 = R = 1 at every position
    gates = 2 * (2 * 12 * 12 * 16 * 9 + 2 * 16)  # both halting units run densely (3×3 conv + pooled fc)
    assert counter.total == 2 * 2 * 12 * 12 * 16 * 16 * 9 + gates
    bodies = [e for e in t.entries if e.name.endswith("/body")]
    assert all(e.executed.sum() == 0 for e in bodies)


def test_sparse_equals_masked_with_partial_halting() -> None:
    model = _model().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, stage in model.blocks():
            for gate in stage.gates:
                gate.conv.weight.copy_(torch.randn(gate.conv.weight.shape, generator=g))
                gate.conv.bias.fill_(1.0)
    x = torch.randn(3, 1, 20, 20, generator=g)
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    rates = [d.rate() for d in tm.decisions.values()]
    assert any(((r > 0) & (r < 1)).any() for r in rates), "the test needs partially halted stages"
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts:
        sparse = model(x)
    torch.testing.assert_close(sparse, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ts.executed_macs(), ts.macs())
    assert (ts.executed_macs() < tm.executed_macs()).all()


def test_ponder_cost_reaches_the_halting_units() -> None:
    model = _model().train()
    x, y = torch.randn(2, 1, 12, 12), torch.tensor([1, 2])
    with dynnet.trace() as t:
        logits = model(x)
    assert "ponder" in t.losses
    loss = model.compute_loss(logits, y, t)
    loss.total.backward()
    assert model.net.layer1.gates[0].conv.bias.grad.abs().item() > 0
