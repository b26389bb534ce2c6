"""DynConv: mask unit, annealed bounds, real skipping with exact MAC accounting."""

from __future__ import annotations

import math

import pytest
import torch

import dynnet
from dynnet.core import Decision
from dynnet.kernels.spatial import receptive_mask
from dynnet.macs import MacCounter
from dynnet.methods.spatial.dynconv import DynConvBlock, block_bounds, block_sparsity_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe="dynconv", in_channels=1, budget=0.5)


def test_bounds_start_at_budget_and_relax() -> None:
    assert block_bounds(0.0, 0.3, 0.33) == pytest.approx((0.3, 0.3))
    assert block_bounds(0.5, 0.3, 0.33) == pytest.approx((0.0, 1.0))
    lo, hi = block_bounds(0.165, 0.3, 0.33)  # half-way: cos(π/4)^2 = 0.5
    assert (lo, hi) == pytest.approx((0.15, 1 - 0.5 * 0.7))


def test_block_sparsity_loss_oracle() -> None:
    f = [torch.tensor(0.9), torch.tensor(0.1), torch.tensor(0.5)]
    loss = block_sparsity_loss(f, 0.3, 0.6)
    assert loss.item() == pytest.approx(((0.9 - 0.6) ** 2 + (0.3 - 0.1) ** 2 + 0.0) / 3)


def test_sparse_block_runs_only_the_dilated_mask() -> None:
    model = _model().eval()
    block = model.net.layer1[0]
    assert isinstance(block, DynConvBlock)
    x = torch.randn(2, 16, 10, 10)
    hard = torch.zeros(2, 10, 10)
    hard[0, 2, 3] = hard[0, 7, 7] = hard[1, 0, 0] = 1.0
    d = Decision(hard=hard, soft=None, granularity="spatial")
    dilated = receptive_mask(hard > 0, 3, 1, 1, 1, (10, 10))
    per_pos = 16 * 16 * 9
    dynnet.set_mode(model, "masked")
    with torch.no_grad():
        masked = block(x, d)
    dynnet.set_mode(model, "sparse")
    with torch.no_grad(), dynnet.trace() as t, MacCounter() as counter:
        out = block(x, d)
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-5)
    expected = (int(dilated.sum()) + 3) * per_pos
    assert counter.total == expected  # the decision is given: the gate does not run
    entry = next(e for e in t.entries if e.name.endswith("/body"))
    assert entry.executed.tolist() == [float((int(dilated[0].sum()) + 2) * per_pos), float((4 + 1) * per_pos)]
    torch.testing.assert_close(entry.macs, entry.executed)
    # positions outside the mask keep the shortcut (then ReLU)
    torch.testing.assert_close(out[1, :, 5, 5], torch.relu(x[1, :, 5, 5]))


def test_closed_masks_cost_only_the_mask_units() -> None:
    model = _model().eval()
    with torch.no_grad():
        for _, b in model.blocks():
            b.gate.conv.bias.fill_(-50.0)
    dynnet.sparse(model)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    body = sum(e.executed for e in t.entries if e.name.endswith("/body"))
    assert torch.equal(body, torch.zeros(3, dtype=torch.float64))
    gates = sum(e.executed for e in t.entries if e.name.endswith("/gate"))
    assert (gates > 0).all()


def test_training_step_gives_the_gates_gradients_from_the_budget() -> None:
    model = _model().train()
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with dynnet.trace() as t:
        logits = model(x)
    loss = model.compute_loss(logits, y, t)
    assert set(loss.parts) == {"task", "network", "blocks"}
    loss.total.backward()
    g = model.net.layer1[0].gate.conv.bias.grad
    assert g is not None and math.isfinite(g.item()) and g.item() != 0.0


def test_annealing_hook_sets_progress() -> None:
    from types import SimpleNamespace

    from dynnet.methods.spatial.dynconv import DynConvAnnealing

    model = _model()
    DynConvAnnealing().on_step_end(SimpleNamespace(model=model, step=30, total_steps=120))
    assert model.progress == 0.25
