"""The exit cascade: trunks, placement, masked vs sparse execution, per-sample MACs against the aten counter."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import dynnet
from dynnet.macs import MacCounter
from dynnet.methods.early_exit import place_exits, trunk_of
from dynnet.methods.early_exit._common import (
    budget_exit_weights,
    entropy_confidence,
    gradient_rescale,
    max_softmax_confidence,
    select,
)


def _model(recipe: str = "branchynet", **kw) -> dynnet.DynamicModel:
    """cifar_resnet8 (stem + 3 blocks) with exits after the stem and the first two blocks."""
    torch.manual_seed(0)
    kw.setdefault("exit_fractions", (0.01, 0.3, 0.6))
    return dynnet.create_model("cifar_resnet8", recipe=recipe, in_channels=1, **kw).eval()


def _x(n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 1, 16, 16), generator=g) * torch.linspace(0.2, 3, n).view(n, 1, 1, 1)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("cifar_resnet8", (1, 16, 16)), ("mobilenet_v2", (3, 32, 32)), ("resnet18", (3, 32, 32))],
)
def test_trunk_composes_to_the_base_network(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    kw = {"in_channels": 1} if name.startswith("cifar") else {}
    base = dynnet.create_model(name, num_classes=10, **kw).eval()
    trunk = trunk_of(base)
    x = torch.randn(2, *shape)
    h = x
    with torch.no_grad():
        for unit in trunk.units:
            h = unit(h)
        torch.testing.assert_close(trunk.head(h), base(x))


def test_unknown_network_is_refused_with_the_known_ones() -> None:
    with pytest.raises(TypeError, match="CifarResNet"):
        trunk_of(torch.nn.Linear(3, 3))


def test_place_exits_by_cumulative_cost() -> None:
    # cumulative fractions 0.1, 0.3, 0.6, 1.0
    assert place_exits([1, 2, 3, 4], [0.1, 0.25, 0.5]) == [0, 1, 2]
    assert place_exits([1, 2, 3, 4], [0.25, 0.3]) == [1]  # duplicates collapse
    with pytest.raises(ValueError):
        place_exits([1, 2, 3, 4], [0.95])  # only the final unit reaches it
    with pytest.raises(ValueError):
        place_exits([1, 2], [1.5])


def test_open_thresholds_reproduce_base_and_closed_ones_stop_everyone_at_the_first_exit() -> None:
    torch.manual_seed(0)
    base = dynnet.create_model("cifar_resnet8", in_channels=1).eval()
    model = dynnet.convert(base, "branchynet", exit_fractions=(0.01, 0.3, 0.6)).eval()
    x = _x()
    torch.testing.assert_close(model(x), base(x))
    model.set_thresholds([-math.inf] * (model.num_exits - 1))
    for mode in ("masked", "sparse"):
        dynnet.set_mode(model, mode)
        with torch.no_grad(), dynnet.trace() as t:
            out = model(x)
        assert torch.equal(t.outputs["exit_index"], torch.zeros(6, dtype=torch.long))
        cost0 = float(model.cascade.cumulative_costs(x)[0])
        torch.testing.assert_close(t.macs(), torch.full((6,), cost0, dtype=torch.float64))
    with torch.no_grad():
        first = model.cascade.exits[0](model.cascade.segment(0, x))
    torch.testing.assert_close(out, first)


@settings(max_examples=6, deadline=None)
@given(st.lists(st.floats(0.1, 0.6), min_size=3, max_size=3), st.integers(1, 7))
def test_sparse_matches_masked_and_counts_exactly(thresholds: list[float], n: int) -> None:
    model = _model()
    model.set_thresholds(thresholds)
    x = _x(n, seed=n)
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as counter:
        sparse = model(x)
    torch.testing.assert_close(sparse, masked, rtol=1e-4, atol=1e-4)
    assert torch.equal(ts.outputs["exit_index"], tm.outputs["exit_index"])
    # Per-sample MACs: exactly the cost of stopping where it stopped; the kernels ran exactly that in sparse mode.
    costs = model.cascade.cumulative_costs(x)
    torch.testing.assert_close(ts.macs(), costs[ts.outputs["exit_index"]])
    assert ts.executed_macs().sum().item() == counter.total
    # Masked mode computes every exit for every sample.
    torch.testing.assert_close(tm.executed_macs(), torch.full((n,), float(costs[-1]), dtype=torch.float64))


def test_exit_decisions_are_recorded_per_exit() -> None:
    model = _model()
    model.set_thresholds([0.2, 0.2, 0.2])
    with torch.no_grad(), dynnet.trace() as t:
        model(_x())
    exits = t.decisions_of("exit")
    assert list(exits) == ["exit0", "exit1", "exit2"]
    stops = torch.stack([d.hard for d in exits.values()], 1)
    assert bool((stops.sum(1) <= 1).all())
    k = t.outputs["exit_index"]
    assert torch.equal(stops.sum(1) == 0, k == model.num_exits - 1)


def test_dense_mode_runs_no_exit() -> None:
    model = _model()
    model.set_thresholds([-math.inf] * 3)
    dynnet.set_mode(model, "dense")
    x = _x()
    with torch.no_grad(), MacCounter() as c:
        model(x)
    assert c.total == 6 * model.dense_macs(x)


def test_training_runs_every_exit_and_records_their_logits() -> None:
    model = _model().train()
    with dynnet.trace() as t:
        model(_x())
    outs = model.exit_outputs(t)
    assert len(outs) == model.num_exits and all(o.shape == (6, 10) for o in outs)
    y = torch.arange(6) % 10
    loss = model.compute_loss(outs[-1], y, t)
    weights = budget_exit_weights(model.stop_costs(t), model.budget)
    expected = sum(w * torch.nn.functional.cross_entropy(o, y) for o, w in zip(outs, weights, strict=True))
    torch.testing.assert_close(loss.total, expected)


def test_confidences_analytic() -> None:
    uniform = torch.zeros(2, 10)
    torch.testing.assert_close(entropy_confidence(uniform), torch.zeros(2))
    torch.testing.assert_close(max_softmax_confidence(uniform), torch.full((2,), 0.1))
    peaked = torch.tensor([[100.0] + [0.0] * 9])
    torch.testing.assert_close(entropy_confidence(peaked), torch.ones(1))
    torch.testing.assert_close(max_softmax_confidence(peaked), torch.ones(1))


def test_gradient_rescale_scales_only_the_gradient() -> None:
    x = torch.randn(4, requires_grad=True)
    y = gradient_rescale(x, 0.25)
    torch.testing.assert_close(y, x)
    (y * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(x.grad, 0.25 * torch.arange(4.0))


def test_select_handles_tuples_and_none() -> None:
    a, b = torch.arange(4).view(4, 1), torch.arange(8).view(4, 2)
    idx = torch.tensor([2, 0])
    out = select((a, b), idx)
    assert isinstance(out, tuple) and torch.equal(out[0], a[idx]) and torch.equal(out[1], b[idx])
    assert select(None, idx) is None


def test_mobilenet_v2_gets_exits_and_runs_sparse() -> None:
    torch.manual_seed(0)
    base = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35).eval()
    model = dynnet.convert(base, "cdl", exit_fractions=(0.3, 0.6)).eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(x), base(x))
    model.set_thresholds([0.0, math.inf])
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    assert torch.equal(t.outputs["exit_index"], torch.zeros(3, dtype=torch.long))
