"""PerforatedCNNs: mask kinds and rates, nearest-neighbour interpolation, sparse == masked, MACs follow the rate."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.methods.spatial.perforated_cnn import (
    PerforatedBlock,
    PerforatedCNNConfig,
    grid_mask,
    impact_masks_,
    interpolation_maps,
    nearest_interpolate,
    pooling_structure_mask,
    set_perforation_,
    uniform_mask,
)
from dynnet.testing import diverse_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**config) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe="perforated_cnn", num_classes=10, **config)


def test_interpolation_fills_skipped_positions_with_the_nearest_evaluated_value() -> None:
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, 0] = mask[3, 4] = True
    v = torch.arange(40.0).view(2, 1, 4, 5)  # two samples, distinct values at every position
    nearest, rank = interpolation_maps(mask)
    out = nearest_interpolate(v, nearest)
    for r in range(4):
        for c in range(5):
            # squared distances to (0, 0) and (3, 4); ties go to the lower flat index, (0, 0)
            src = (0, 0) if r * r + c * c <= (r - 3) ** 2 + (c - 4) ** 2 else (3, 4)
            torch.testing.assert_close(out[:, 0, r, c], v[:, 0, src[0], src[1]])
    assert torch.equal(out[:, :, 0, 0], v[:, :, 0, 0]) and torch.equal(out[:, :, 3, 4], v[:, :, 3, 4])
    assert set(rank.tolist()) == {0, 1}
    static = interpolation_maps(mask, static=True)  # the export-friendly variant gives the same maps
    assert torch.equal(static[0], nearest) and torch.equal(static[1], rank)
    g = torch.Generator().manual_seed(0)
    for keep in (0.05, 0.3, 0.7):
        m = uniform_mask((7, 9), keep, g)
        dyn, stat = interpolation_maps(m), interpolation_maps(m, static=True)
        assert torch.equal(dyn[0], stat[0]) and torch.equal(dyn[1], stat[1])
        assert bool(m.reshape(-1)[dyn[0]].all()), "every position reads an evaluated one"


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.5, 0.9])
def test_masks_have_the_requested_rate(keep: float) -> None:
    size = (16, 16)
    target = round(keep * 256)
    assert int(uniform_mask(size, keep, torch.Generator().manual_seed(1)).sum()) == target
    assert int(pooling_structure_mask(size, keep, generator=torch.Generator().manual_seed(1)).sum()) == target
    grid = grid_mask(size, keep)
    assert abs(int(grid.sum()) - target) <= 0.05 * target + 1
    rows, cols = grid.any(1), grid.any(0)
    assert torch.equal(grid, rows[:, None] & cols[None, :]), "a grid is a product of rows and columns"


def test_pooling_structure_keeps_the_most_covered_positions() -> None:
    # 3×3 stride-2 windows on 9 positions start at 0, 2, 4, 6: positions 2, 4, 6 lie in two windows, others in one
    mask = pooling_structure_mask((9, 9), 9 / 81, kernel=3, stride=2, padding=0)
    expected = torch.zeros(9, 9, dtype=torch.bool)
    expected[2:7:2, 2:7:2] = True
    assert torch.equal(mask, expected)
    # a 3×3 stride-1 padded reader covers border positions by fewer windows: the interior goes first
    mask = pooling_structure_mask((8, 8), 36 / 64)
    assert bool(mask[1:7, 1:7].all()) and int(mask.sum()) == 36


def test_fresh_conversion_is_the_base_and_budget_perforates() -> None:
    model = _model()
    assert all(bool(b.gate.mask(i).all()) for b in model.perforated_blocks() for i in range(b.gate.stages))
    assert float(model.calibration[0]) == 1.0
    for kind in ("uniform", "grid", "pooling"):
        model = _model(budget=0.25, mask=kind)
        keep = float(model.calibration[0])  # the evaluated fraction derived from the MAC budget
        assert 0.1 < keep < 0.25  # the stem, shortcuts and classifier are not perforated
        for block in model.perforated_blocks():
            for i in range(block.gate.stages):
                assert float(block.gate.mask(i).float().mean()) == pytest.approx(keep, abs=0.05)
        with torch.no_grad(), dynnet.trace() as t:
            model.eval()(diverse_inputs(2, (3, 32, 32)))
        assert float(t.mac_fraction()[0]) == pytest.approx(0.25, abs=0.005)
        assert model.mask_mac_fraction() == pytest.approx(float(t.mac_fraction()[0]), abs=1e-9)


def test_config_rejects_impact_and_bad_budgets() -> None:
    with pytest.raises(ValueError, match="impact_masks_"):
        PerforatedCNNConfig(mask="impact")
    with pytest.raises(ValueError, match="budget"):
        PerforatedCNNConfig(budget=0.0)


@pytest.mark.parametrize("kind", ["uniform", "grid", "pooling"])
def test_sparse_equals_masked_and_macs_are_exact(kind: str) -> None:
    model = _model()
    rates = set_perforation_(model, kind, 0.4, seed=3)
    assert all(abs(r - 0.4) < 0.05 for r in rates.values())
    x = diverse_inputs(5, (3, 32, 32))
    model.eval()
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as counter:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ts.macs(), tm.macs())
    assert ts.executed_macs().sum().item() == pytest.approx(counter.total, abs=0.5)
    assert ts.executed_macs().sum().item() == pytest.approx(ts.macs().sum().item(), abs=0.5)
    for key, d in ts.decisions.items():
        assert torch.equal(d.hard, d.hard[:1].expand_as(d.hard)), key


def test_macs_scale_with_the_evaluated_fraction() -> None:
    model = _model().eval()
    x = diverse_inputs(2, (3, 32, 32))
    body = {}
    for keep in (1.0, 0.5, 0.25):
        set_perforation_(model, "uniform", keep)
        with torch.no_grad(), dynnet.trace() as t:
            model(x)
        body[keep] = sum(e.macs[0].item() for e in t.entries if e.name.endswith("/body"))
    assert body[0.5] == pytest.approx(0.5 * body[1.0], rel=0.01)
    assert body[0.25] == pytest.approx(0.25 * body[1.0], rel=0.01)


def test_block_perforates_every_stage_with_its_own_mask() -> None:
    """Sparse block output == dense stages, each interpolated from its own mask's evaluated positions."""
    model = _model(budget=0.3).eval()
    block = model.net.layer2[0]  # stride 2: input 32×32, both stages 16×16
    assert isinstance(block, PerforatedBlock)
    x = torch.randn(3, 16, 32, 32)
    with torch.no_grad():
        h = x
        for i, st in enumerate(block._stages):
            h = st.conv(h)
            h = st.bn(h)
            if st.act is not None:
                h = st.act(h)
            nearest, _ = interpolation_maps(block.gate.mask(i))
            h = nearest_interpolate(h, nearest)
        expected = block.post(block.shortcut(x) + h)
        block.mode = "sparse"
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-4)


def test_other_input_sizes_resample_the_masks() -> None:
    model = _model(budget=0.5).eval()
    x = diverse_inputs(2, (3, 24, 24))
    with torch.no_grad():
        masked = model(x)
        dynnet.sparse(model)
        torch.testing.assert_close(model(x), masked, rtol=1e-4, atol=1e-4)


def test_impact_masks_remove_the_least_important_positions() -> None:
    model = _model()
    g = torch.Generator().manual_seed(0)
    batches = [(diverse_inputs(4, (3, 32, 32), seed=s), torch.randint(0, 10, (4,), generator=g)) for s in range(2)]
    params = [p.clone() for p in model.parameters()]
    scores = impact_masks_(model, batches, 0.5, rounds=2)
    for block in model.perforated_blocks():
        for i in range(block.gate.stages):
            m = block.gate.mask(i)
            assert int(m.sum()) == round(0.5 * m.numel())
            s = scores[f"{block.block_name}/conv{i + 1}"]
            # the kept positions are the most important ones of the last round
            assert float(s[m].min()) >= float(s[~m].max())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert model.training and all(b.mode == "masked" for b in model.perforated_blocks())


def test_masks_survive_a_state_dict_round_trip_and_train() -> None:
    model = _model(budget=0.5, mask="pooling")
    other = _model()
    other.load_state_dict(model.state_dict())
    for a, b in zip(model.perforated_blocks(), other.perforated_blocks(), strict=True):
        assert all(torch.equal(a.gate.mask(i), b.gate.mask(i)) for i in range(a.gate.stages))
    x, y = diverse_inputs(4, (3, 32, 32)), torch.arange(4)
    with dynnet.trace() as t:
        logits = other.train()(x)
    loss = other.compute_loss(logits, y, t)
    loss.total.backward()
    assert set(loss.parts) == {"task"}
    assert other.net.layer1[0].conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind,plan", [("grid", "grid"), ("uniform", "gather"), ("pooling", "gather")])
def test_sparse_mode_plans_grid_masks_as_one_strided_convolution(kind: str, plan: str) -> None:
    """A Cartesian (grid) mask runs as a dense convolution over the gathered rows/columns; others as im2col+GEMM."""
    from dynnet.methods.spatial.perforated_cnn import stage_plan

    model = _model()
    set_perforation_(model, kind, 0.4, seed=1)
    block = model.perforated_blocks()[1]  # layer2.0: its first stage has stride 2
    for i, st in enumerate(block._stages):
        mask = block.gate.mask(i)
        p = stage_plan(mask, st.geometry, (32, 32) if i == 0 else tuple(mask.shape))
        assert p.kind == plan and p.evaluated == int(mask.sum()) and p.out_size == tuple(mask.shape)
    evaluated = sum(int(block.gate.mask(i).sum()) * st.per_position for i, st in enumerate(block._stages))
    for n in (1, 3):  # batch 1 takes the strided-convolution path for grid masks, larger batches the pixel engine
        x = diverse_inputs(n, (16, 32, 32))
        block.mode = "masked"
        with torch.no_grad():
            masked = block.eval()(x)
            block.mode = "sparse"
            with MacCounter() as counter:
                sparse_out = block(x)
        torch.testing.assert_close(sparse_out, masked, rtol=1e-4, atol=1e-4)
        shortcut = counter.total - n * evaluated
        assert 0 <= shortcut < n * evaluated  # the branch's MACs: the evaluated positions only (+ the 1×1 shortcut)
