"""The latency model: tables interpolate measured points, a trace's predicted latency is the sum of its parts' tables,
it is differentiable, it round-trips through JSON, and a latency budget replaces the MAC budget in the loss."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.core.latency import REST, LatencyModel, LatencyTable, PartLatency, part_fractions
from dynnet.testing import diverse_inputs, scramble_until_mixed

pytestmark = pytest.mark.usefixtures("one_thread")


def test_table_is_the_median_of_measured_points_and_interpolates_between_them() -> None:
    table = LatencyTable.fit([0.0, 0.0, 0.0, 1.0, 1.0], [1.0, 1.2, 0.8, 3.0, 3.0])
    assert table.x == (0.0, 1.0) and table.ms == (1.0, 3.0)
    got = table(torch.tensor([0.0, 0.25, 0.5, 1.0]))
    torch.testing.assert_close(got, torch.tensor([1.0, 1.5, 2.0, 3.0], dtype=torch.float64))
    # no extrapolation: a fraction never measured takes the nearest knot's value
    torch.testing.assert_close(table(torch.tensor([-1.0, 2.0])), torch.tensor([1.0, 3.0], dtype=torch.float64))


def test_table_keeps_at_most_knots_increasing_and_passes_through_a_linear_law() -> None:
    x = torch.linspace(0, 1, 101).tolist()
    table = LatencyTable.fit(x, [2.0 + 3.0 * v for v in x], knots=5)
    assert len(table.x) == 5
    assert all(b > a for a, b in zip(table.x, table.x[1:], strict=False))
    probe = torch.tensor([0.1, 0.33, 0.62, 0.9])
    torch.testing.assert_close(table(probe), 2.0 + 3.0 * probe.double())


def test_table_refuses_bad_knots() -> None:
    with pytest.raises(ValueError, match="increase strictly"):
        LatencyTable((0.5, 0.5), (1.0, 2.0))
    with pytest.raises(ValueError, match="as many"):
        LatencyTable.fit([0.1], [])


@pytest.fixture
def model() -> dynnet.DynamicModel:
    torch.manual_seed(0)
    m = dynnet.create_model("cifar_resnet8", recipe="convnet_aig", width=0.5, in_channels=1)
    scramble_until_mixed(m, diverse_inputs(8, (1, 16, 16), seed=1))
    return m


def _linear_model(model: dynnet.DynamicModel) -> LatencyModel:
    """A latency model with table ``a_i + b_i * x`` for block i and a constant rest."""
    parts = {}
    for i, (name, _) in enumerate(model.blocks()):
        short = name.removeprefix("net.")
        table = LatencyTable((0.0, 1.0), (0.1 * (i + 1), 0.1 * (i + 1) + 1.0 + i))
        parts[name] = PartLatency((f"{short}/body", f"{short}/gate"), table, dense_ms=1.5 + i)
    parts[REST] = PartLatency((), LatencyTable((1.0,), (0.25,)), dense_ms=0.25)
    return LatencyModel({"cpu": "test"}, model.recipe, (1, 16, 16), {1: parts})


def test_trace_latency_is_the_sum_of_each_blocks_table_at_its_decisions(model: dynnet.DynamicModel) -> None:
    lm = _linear_model(model)
    model.set_latency_model_(lm)
    dynnet.sparse(model)
    x = diverse_inputs(8, (1, 16, 16), seed=1)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    expected = torch.full((8,), 0.25, dtype=torch.float64)
    for i, (name, _) in enumerate(model.blocks()):
        short = name.removeprefix("net.")
        entries = {e.name: e for e in t.entries}
        body, gate = entries[f"{short}/body"], entries[f"{short}/gate"]
        kept = t.decisions[short].hard.reshape(-1).double()  # the block's decision: 1 runs the body
        fraction = (kept * body.maximum + gate.maximum) / (body.maximum + gate.maximum)
        expected += 0.1 * (i + 1) + (1.0 + i) * fraction
    assert 0 < float(torch.cat([d.hard.reshape(-1) for d in t.decisions.values()]).mean()) < 1, "mixed decisions"
    torch.testing.assert_close(t.latency(), expected)
    assert t.dense_latency() == pytest.approx(0.25 + 1.5 + 2.5 + 3.5)
    torch.testing.assert_close(t.latency_fraction(), expected / t.dense_latency())


def test_predicted_latency_has_the_gradient_of_the_straight_through_decisions(model: dynnet.DynamicModel) -> None:
    model.set_latency_model_(_linear_model(model), budget_ms=2.0)
    model.train()
    with dynnet.trace() as t:
        model(diverse_inputs(8, (1, 16, 16), seed=1))
    loss = t.budget_loss(0.5)
    torch.testing.assert_close(loss, t.latency_budget_loss(0.5))
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".gate." in n and p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    # without budget_ms the same model's budget loss is the MAC one
    model.set_latency_model_(model.latency_model)
    with dynnet.trace() as t:
        model(diverse_inputs(8, (1, 16, 16), seed=1))
    torch.testing.assert_close(t.budget_loss(0.5), ((t.macs().mean() / t.dense_macs()).float() - 0.5) ** 2)


def test_default_objective_targets_budget_ms_as_a_fraction_of_the_dense_latency(model: dynnet.DynamicModel) -> None:
    lm = _linear_model(model)
    model.set_latency_model_(lm, budget_ms=3.875)
    assert model.latency_budget == pytest.approx(3.875 / lm.dense_ms())
    model.train()
    with dynnet.trace() as t:
        logits = model(diverse_inputs(8, (1, 16, 16), seed=1))
    out = dynnet.DynamicModel.compute_loss(model, logits, torch.zeros(8, dtype=torch.long), t)
    assert out.parts["budget"] == pytest.approx(float(t.latency_budget_loss(model.latency_budget).detach()), rel=1e-6)


def test_budget_ms_is_checked(model: dynnet.DynamicModel) -> None:
    lm = _linear_model(model)
    with pytest.raises(ValueError, match="exceeds the dense"):
        model.set_latency_model_(lm, budget_ms=100.0)
    with pytest.raises(ValueError, match="needs a latency model"):
        model.set_latency_model_(None, budget_ms=1.0)
    with pytest.raises(ValueError, match="positive"):
        model.set_latency_model_(lm, budget_ms=0.0)
    with dynnet.trace() as t:
        model(diverse_inputs(2, (1, 16, 16), seed=1))
    with pytest.raises(RuntimeError, match="no latency model"):
        t.latency()


def test_json_round_trip_predicts_the_same(model: dynnet.DynamicModel, tmp_path) -> None:
    lm = _linear_model(model)
    lm.error = {1: {"median": 0.05, "p90": 0.1, "samples": 4}}
    back = LatencyModel.load(lm.save(tmp_path / "lm.json"))
    assert back.as_dict() == lm.as_dict()
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t:
        model(diverse_inputs(8, (1, 16, 16), seed=1))
    torch.testing.assert_close(t.latency(back), t.latency(lm))


def test_part_fractions_put_unknown_entries_in_the_rest() -> None:
    t = dynnet.Trace()
    t.record_macs("a/body", torch.tensor([0.0, 10.0]), maximum=10.0)
    t.record_macs("a/gate", 2.0, batch_size=2, maximum=2.0)
    t.record_macs("static", 5.0, batch_size=2, maximum=5.0)
    fr = part_fractions(t, {"a": ["a/body", "a/gate"]})
    torch.testing.assert_close(fr["a"], torch.tensor([2 / 12, 1.0], dtype=torch.float64))
    torch.testing.assert_close(fr[REST], torch.ones(2, dtype=torch.float64))


def test_convert_with_budget_ms_attaches_the_latency_model(model: dynnet.DynamicModel, tmp_path) -> None:
    path = _linear_model(model).save(tmp_path / "lm.json")
    torch.manual_seed(0)
    base = dynnet.create_model("cifar_resnet8", width=0.5, in_channels=1)
    converted = dynnet.convert(base, "convnet_aig", budget_ms=3.0, latency_model=path)
    assert converted.budget_ms == 3.0 and converted.latency_model.as_dict() == _linear_model(model).as_dict()
    with pytest.raises(ValueError, match="needs latency_model"):
        dynnet.convert(base, "convnet_aig", budget_ms=3.0)
    other = dynnet.convert(dynnet.create_model("cifar_resnet20", width=0.5, in_channels=1), "convnet_aig")
    assert "net.layer1.2" in dict(other.blocks())
    foreign = LatencyModel({}, "convnet_aig", (1, 16, 16), {1: {"net.layer1.2": _part()}})
    with pytest.raises(ValueError, match="profiled on another network"):
        converted.set_latency_model_(foreign)


def _part() -> PartLatency:
    return PartLatency(("layer1.2/body",), LatencyTable((0.0, 1.0), (0.0, 1.0)), 1.0)
