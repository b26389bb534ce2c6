"""SBNet: tile decisions, haloed tile execution equal to the dense block at active tiles."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.core import Decision
from dynnet.macs import MacCounter
from dynnet.methods.block.sbnet import SBNetBlock

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(tile: int = 4):
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe="sbnet", in_channels=1, tile=tile).eval()


def test_decisions_are_tiles() -> None:
    model = _model(tile=4)
    with torch.no_grad(), dynnet.trace() as t:
        model(torch.randn(2, 1, 28, 28))
    shapes = [tuple(d.hard.shape) for d in t.decisions.values()]
    assert shapes == [(2, 7, 7), (2, 4, 4), (2, 2, 2)]
    assert all(d.granularity == "block" for d in t.decisions.values())


def test_active_tiles_equal_the_dense_block_and_halos_are_counted() -> None:
    model = _model(tile=4)
    block = model.net.layer2[0]  # stride 2, 16 → 32 channels, 28×28 → 14×14 (4 × 4 tiles, partial border)
    assert isinstance(block, SBNetBlock)
    x = torch.randn(2, 16, 28, 28)
    hard = torch.zeros(2, 4, 4)
    hard[0, 0, 0] = hard[0, 3, 3] = hard[1, 1, 2] = 1.0
    d = Decision(hard=hard, soft=None, granularity="block")
    with torch.no_grad():
        dense = block.forward_dense(x)
        dynnet.set_mode(model, "sparse")
        with dynnet.trace() as t, MacCounter() as counter:
            out = block(x, d)
    pixels = hard.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :14, :14].bool()
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[pixels], dense.permute(0, 2, 3, 1)[pixels])
    shortcut = torch.relu(block.shortcut(x))
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[~pixels], shortcut.permute(0, 2, 3, 1)[~pixels])
    # conv1 (3×3, stride 2, 16→32) on a 6×6 region per tile, conv2 (3×3, 32→32) on the 4×4 tile; 1×1 shortcut dense
    per_tile = 36 * 32 * 16 * 9 + 16 * 32 * 32 * 9
    shortcut_macs = 2 * 14 * 14 * 32 * 16
    assert counter.total == 3 * per_tile + shortcut_macs
    body = next(e for e in t.entries if e.name.endswith("/body"))
    assert body.executed.tolist() == [2.0 * per_tile, 1.0 * per_tile]
    assert (body.executed >= body.macs).all()


def test_sparse_never_executes_more_than_dense_when_halos_would_cost_more() -> None:
    """Tile 2 on a 3×3 chain: each 2×2 output tile computes a 4×4 region of conv1 (4× its own positions), so with most
    tiles on the haloed tiles cost more than the dense branch: sparse mode then runs the masked dense branch (the
    same values) and records the dense cost, not more."""
    from dynnet.kernels.chain import tile_macs

    model = _model(tile=2)
    block = model.net.layer1[0]  # 16 → 16, stride 1, 28×28: 14×14 tiles of 2
    assert isinstance(block, SBNetBlock)
    x = torch.randn(2, 16, 28, 28)
    body = 2 * 28 * 28 * 16 * 16 * 9  # both convolutions, per sample
    assert tile_macs(block._stages, 2) == 16 * 16 * 16 * 9 + 4 * 16 * 16 * 9  # conv1 on 4×4, conv2 on 2×2
    for keep, dense_expected in ((0.1, False), (0.9, True)):
        hard = (torch.rand(2, 14, 14, generator=torch.Generator().manual_seed(1)) < keep).float()
        assert (int(hard.sum()) * tile_macs(block._stages, 2) >= 2 * body) == dense_expected  # the precondition
        d = Decision(hard=hard, soft=None, granularity="block")
        with torch.no_grad():
            dynnet.set_mode(model, "masked")
            masked = block(x, d)
            dynnet.set_mode(model, "sparse")
            with dynnet.trace() as t, MacCounter() as counter:
                out = block(x, d)
        torch.testing.assert_close(out, masked)
        executed = next(e for e in t.entries if e.name.endswith("/body")).executed
        assert float(executed.sum()) <= 2 * body + 1e-6
        assert (float(executed.sum()) == 2 * body) == dense_expected
        assert counter.total == float(executed.sum())  # no shortcut MACs: identity shortcut


def test_tile_mask_unit_averages_partial_tiles() -> None:
    model = _model(tile=4)
    gate = model.net.layer1[0].gate
    with torch.no_grad():
        logits = gate(torch.randn(1, 16, 6, 6))
    assert logits.shape == (1, 2, 2)


def test_budget_loss_trains_the_mask_units() -> None:
    model = _model().train()
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with dynnet.trace() as t:
        logits = model(x)
    loss = model.compute_loss(logits, y, t, budget=0.3)
    loss.total.backward()
    assert model.net.layer1[0].gate.conv.bias.grad.abs().item() > 0


def test_the_knob_shifts_every_tile_logit_and_calibration_hits_the_budget() -> None:
    """The offset on the mask units' bias moves every tile's logit by itself (partial border tiles too: a tile's
    logit is a mean), so the MAC fraction grows with it; calibration brings it to the budget."""
    model = _model(tile=4)
    block = model.net.layer2[0]
    x = torch.randn(2, 16, 28, 28)  # 14×14 output: partial border tiles
    knob = model.budget_knob()
    with torch.no_grad():
        before = block.gate(x)
        knob.set(-2.5)
        torch.testing.assert_close(block.gate(x), before - 2.5)
    images = torch.randn(32, 1, 28, 28)
    fractions = []
    for v in (-30.0, -6.0, 0.0, 30.0):
        knob.set(v)
        dynnet.sparse(model)
        with torch.no_grad(), dynnet.trace() as t:
            model(images)
        fractions.append(float(t.mac_fraction().mean()))
    assert fractions == sorted(fractions) and fractions[0] < 0.1 and fractions[-1] > 0.99
    with torch.no_grad():
        for _, b in model.blocks():
            b.gate.conv.weight.normal_(0, 0.3)  # logits that depend on the input
    report = dynnet.calibrate(model, images, 0.5, tolerance=0.02)
    assert report.within_tolerance, report.summary()
    assert model.calibrated_budget == 0.5
