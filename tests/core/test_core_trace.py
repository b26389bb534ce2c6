import pytest
import torch

import dynnet
from dynnet.core import Decision, current_trace, no_trace


def test_trace_is_scoped_and_nested() -> None:
    assert current_trace() is None
    with dynnet.trace() as outer:
        assert current_trace() is outer
        with dynnet.trace() as inner:
            assert current_trace() is inner
        with no_trace():
            assert current_trace() is None
        assert current_trace() is outer
    assert current_trace() is None


def test_mac_sums_bounds_and_budget_loss() -> None:
    with dynnet.trace() as t:
        t.record_macs("static", 10.0, batch_size=2, dense=10.0)
        z = torch.tensor([1.0, 0.0], requires_grad=True)
        t.record_macs("block/body", z * 30.0, minimum=0.0, maximum=30.0, dense=30.0)
        t.record_macs("block/gate", 1.0, batch_size=2)
    assert torch.equal(t.macs().detach(), torch.tensor([41.0, 11.0], dtype=torch.float64))
    assert t.min_macs() == 11.0 and t.max_macs() == 41.0 and t.dense_macs() == 40.0
    loss = t.budget_loss(0.5)
    expected = ((41.0 + 11.0) / 2 / 40.0 - 0.5) ** 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_executed_defaults_to_theoretical() -> None:
    with dynnet.trace() as t:
        t.record_macs("a", torch.tensor([3.0, 4.0]))
        t.record_macs("b", torch.tensor([3.0, 4.0]), executed=5.0)
    assert t.executed_macs().tolist() == [8.0, 9.0]


def test_repeated_names_get_suffixes_and_losses_add() -> None:
    d = Decision(torch.ones(2), torch.ones(2), "layer")
    with dynnet.trace() as t:
        assert t.record_decision("blk", d) == "blk"
        assert t.record_decision("blk", d) == "blk#1"
        t.add_loss("ponder", torch.tensor(1.0))
        t.add_loss("ponder", torch.tensor(2.0))
    assert t.aux_loss().item() == 3.0
    with pytest.raises(ValueError, match="scalar"):
        t.add_loss("bad", torch.ones(2))


def test_errors() -> None:
    with dynnet.trace() as t:
        with pytest.raises(RuntimeError, match="no MACs"):
            t.macs()
        with pytest.raises(ValueError, match="Tensor\\[N\\]"):
            t.record_macs("x", torch.ones(2, 2))
        with pytest.raises(ValueError, match="batch_size"):
            t.record_macs("x", 3.0)
        t.record_macs("x", 1.0, batch_size=1, dense=1.0)
        for bad in (0.0, 1.5, -1, float("nan")):
            with pytest.raises(ValueError, match="budget"):
                t.budget_loss(bad)
    with pytest.raises(ValueError, match="granularity"):
        Decision(torch.ones(2), None, "pixels")
    with pytest.raises(ValueError, match="batch size"):
        Decision(torch.ones(2), torch.ones(3), "layer")
