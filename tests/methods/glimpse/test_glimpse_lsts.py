"""LSTS: a grid of sampling locations moved by learned offsets (trained through bilinear sampling), similarity
aggregation, and keep gates whose dropped patches are never encoded."""

import pytest
import torch
import torch.nn.functional as F

import dynnet
from dynnet.macs import MacCounter
from dynnet.methods.glimpse.lsts import grid_points, similarity_aggregate


def _create(**kw: object) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe="lsts", in_channels=1, **kw).eval()


def _x(n: int) -> torch.Tensor:
    return torch.randn((n, 1, 32, 32), generator=torch.Generator().manual_seed(3))


def _mixed_gates(model: dynnet.DynamicModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.net.gate.weight.copy_(torch.randn(model.net.gate.weight.shape, generator=g))
        model.net.gate.bias.fill_(0.0)


# -- pure functions -----------------------------------------------------------------------------------
def test_grid_points_are_cell_centres() -> None:
    expected = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
    torch.testing.assert_close(grid_points(2), expected)
    assert grid_points(3)[4].abs().sum() == 0  # the middle of a 3 × 3 grid is the image centre


def test_similarity_aggregate_is_a_softmax_over_the_kept_entries() -> None:
    g = torch.Generator().manual_seed(0)
    values, keys, query = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 4, generator=g), torch.randn(2, 4)
    keep = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    out, w = similarity_aggregate(values, keys, query, keep)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    assert (w[keep == 0] == 0).all()
    kept = [0, 1, 3]
    ref = torch.softmax(keys[0, kept] @ query[0] / 2.0, 0)
    torch.testing.assert_close(w[0, kept], ref)
    torch.testing.assert_close(out[0], ref @ values[0, kept])
    torch.testing.assert_close(out[1], values[1, 0])  # only the first entry kept
    # What dropped entries hold does not matter (sparse mode leaves them zero, masked mode computes them).
    values2, keys2 = values.clone(), keys.clone()
    values2[keep == 0], keys2[keep == 0] = 1e4, 50.0
    out2, w2 = similarity_aggregate(values2, keys2, query, keep)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(w2, w)


# -- locations ----------------------------------------------------------------------------------------
def test_fresh_policy_samples_the_grid_and_patches_are_exact_crops() -> None:
    model = _create(grid=2, patch_size=16)
    x = _x(3)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    torch.testing.assert_close(t.outputs["lsts/locations"], grid_points(2).expand(3, -1, -1))
    assert (t.outputs["lsts/offsets"] == 0).all()
    # On a 2 × 2 grid with 16-pixel patches of a 32 × 32 image, the patches are the image's quadrants.
    crops = model.net._crops(x, t.outputs["lsts/locations"]).view(3, 4, 1, 16, 16)
    torch.testing.assert_close(crops[:, 0], x[..., :16, :16])
    torch.testing.assert_close(crops[:, 3], x[..., 16:, 16:])


def test_offsets_move_the_sampling_locations_within_their_cell() -> None:
    model = _create(grid=3, max_offset=0.5)
    with torch.no_grad():
        model.net.policy.bias.copy_(torch.tensor([0.4, -10.0]))
        model.net.policy.weight.normal_(generator=torch.Generator().manual_seed(0))
    x = _x(4)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    offsets, locations = t.outputs["lsts/offsets"], t.outputs["lsts/locations"]
    torch.testing.assert_close(locations, grid_points(3) + offsets)
    cell = 2.0 / 3
    assert (offsets.abs() <= 0.5 * cell + 1e-6).all() and (offsets.abs() > 0).all()
    assert not torch.allclose(offsets[0], offsets[1])  # per-input locations


def test_offsets_get_gradients_through_bilinear_sampling() -> None:
    model = _create(grid=2).train()
    with torch.no_grad():  # keep the gates out of the way: the gradient must come through the crops
        model.net.gate.bias.fill_(20.0)
    x, y = _x(6), torch.arange(6)
    with dynnet.trace() as t:
        logits = model(x)
    locations = t.outputs["lsts/locations"]
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), locations, retain_graph=True)
    assert grad.abs().sum() > 0
    model.compute_loss(logits, y, t).total.backward()
    assert model.net.policy.weight.grad.abs().sum() > 0 and model.net.policy.bias.grad.abs().sum() > 0


# -- sparse execution ---------------------------------------------------------------------------------
def test_sparse_encodes_only_the_kept_patches_and_equals_masked() -> None:
    model = _create(grid=3)
    _mixed_gates(model)
    x = _x(8)
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    keep = tm.decisions["lsts/patches"].hard
    count = keep.sum(1).double()
    assert len(count.unique()) > 1, "the test needs images that keep different numbers of patches"
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as counter:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ts.outputs["lsts/weights"], tm.outputs["lsts/weights"], rtol=1e-5, atol=1e-6)
    e = {entry.name: entry for entry in ts.entries}
    patch = model.net._macs_cache[("patch", (1, 16, 16))]
    torch.testing.assert_close(e["lsts/patches"].executed, count * patch)
    fixed = sum(e[k].executed for k in ("lsts/glance", "lsts/gate", "lsts/head"))
    torch.testing.assert_close(ts.executed_macs(), fixed + count * patch)
    assert counter.total == pytest.approx(float(ts.executed_macs().sum()), abs=0.5)
    # Masked mode encodes all 9 patches of every image.
    torch.testing.assert_close(tm.executed_macs(), fixed + 9.0 * patch)


def test_all_gates_closed_runs_no_patch_and_predicts_from_the_coarse_token() -> None:
    model = _create()
    with torch.no_grad():
        model.net.gate.bias.fill_(-20.0)
    dynnet.sparse(model)
    x = _x(3)
    with torch.no_grad(), dynnet.trace() as t, MacCounter() as counter:
        y = model(x)
    assert counter.total == pytest.approx(float(t.executed_macs().sum()), abs=0.5)
    assert (next(e for e in t.entries if e.name == "lsts/patches").executed == 0).all()
    with torch.no_grad():
        _, _, _, token, _, _ = model.net.glance(x)
        torch.testing.assert_close(y, model.net.classifier(token))


def test_dense_patch_cost_scales_with_the_number_of_locations() -> None:
    costs = {}
    for grid in (2, 3):
        model = _create(grid=grid)
        with torch.no_grad(), dynnet.trace() as t:
            model(_x(2))
        costs[grid] = next(e for e in t.entries if e.name == "lsts/patches").dense
    assert costs[3] / costs[2] == pytest.approx(9 / 4)


def test_budget_loss_reaches_the_gates() -> None:
    model = _create(budget=0.3).train()
    x, y = _x(6), torch.arange(6)
    with dynnet.trace() as t:
        logits = model(x)
    out = model.compute_loss(logits, y, t)
    assert set(out.parts) == {"task", "budget"} and out.parts["budget"] > 0
    out.total.backward()
    assert model.net.gate.weight.grad.abs().sum() > 0
