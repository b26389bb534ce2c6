"""`DynamicModel.batch_engine`: an untraced sparse batch runs sample by sample, or masked, where that is faster
(autotune), with the same logits, and never outside sparse inference."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.kernels import autotune
from dynnet.testing import diverse_inputs, scramble_until_mixed


@pytest.fixture
def mixed() -> tuple[dynnet.DynamicModel, torch.Tensor]:
    """A SkipNet ResNet-8 whose gates skip some blocks for some of the 6 inputs."""
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="skipnet", in_channels=3, num_classes=10).eval()
    x = diverse_inputs(6, (3, 16, 16))
    scramble_until_mixed(model, x)
    return model, x


def _counting_runs(model: dynnet.DynamicModel, calls: list[int], cost: dict[str, float] | None = None) -> None:
    """Record the batch size of every ``model.run`` call (negative in masked mode); with ``cost``, advance the fake
    clock by ``cost["masked"]`` for a call in masked mode, ``cost["batched"]`` for a batch and ``cost["sample"]`` for
    one sample."""
    run = model.run
    block = next(b for _, b in dynnet.core.dynamic_blocks(model))

    def counted(x: torch.Tensor) -> torch.Tensor:
        masked = block.mode == "masked"
        calls.append(-x.shape[0] if masked else x.shape[0])
        if cost is not None:
            cost["t"] += cost.get("masked", 1e9) if masked else cost["sample"] if x.shape[0] == 1 else cost["batched"]
        return run(x)

    model.run = counted


def test_per_sample_runs_each_sample_and_gives_the_batched_logits(mixed) -> None:
    model, x = mixed
    dynnet.sparse(model)
    with torch.inference_mode(), dynnet.trace() as t:
        batched = model(x)
    skipped = torch.stack([d.rate() for d in t.decisions.values()])
    assert bool((skipped == 0).any()) and bool((skipped == 1).any())  # precondition: decisions are mixed
    calls: list[int] = []
    _counting_runs(model, calls)
    model.batch_engine = "per_sample"
    with torch.inference_mode():
        per_sample = model(x)
    assert calls == [1] * 6
    torch.testing.assert_close(per_sample, batched, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("state", ["masked", "training", "autograd", "traced", "batched"])
def test_anything_but_untraced_sparse_inference_runs_batched(mixed, state: str) -> None:
    model, x = mixed
    model.batch_engine = "batched" if state == "batched" else "per_sample"
    dynnet.set_mode(model, "masked" if state == "masked" else "sparse")
    model.train(state == "training")
    calls: list[int] = []
    _counting_runs(model, calls)
    with torch.set_grad_enabled(state in ("training", "autograd")):
        if state == "traced":
            with dynnet.trace():
                model(x)
        else:
            model(x)
    assert calls == [-6 if state == "masked" else 6]  # one batched call (in the mode the user set)


def test_auto_times_both_once_per_shape_and_keeps_the_faster(mixed, fake_clock: dict[str, float]) -> None:
    model, x = mixed
    dynnet.sparse(model)
    calls: list[int] = []
    fake_clock.update(batched=10.0, sample=1.0)  # six samples cost 6 < 10: per sample wins
    _counting_runs(model, calls, fake_clock)
    with torch.inference_mode():
        model(x)
        runs = len(calls)
        assert runs == (1 + autotune.REPEATS) * (1 + 6 + 1) + 6  # the three measured, then the winner runs
        assert calls.count(-6) == 1 + autotune.REPEATS  # masked mode timed too
        model(x)
        assert calls[runs:] == [1] * 6  # cached: the winner again, nothing measured
        fake_clock.update(batched=4.0)
        model(x[:3])  # a new shape is timed afresh: 3 samples cost 3 < 4
        assert calls[-3:] == [1, 1, 1]
        model(x[:5])  # 5 > 4: batched
        assert calls[-1] == 5


def test_an_unknown_engine_is_refused_in_one_line(mixed) -> None:
    model, x = mixed
    dynnet.sparse(model)
    model.batch_engine = "fastest"
    with torch.inference_mode(), pytest.raises(ValueError, match="batch_engine must be"):
        model(x)


def test_masked_engine_runs_the_decisions_as_masks_with_the_sparse_logits(mixed) -> None:
    model, x = mixed
    dynnet.sparse(model)
    with torch.inference_mode(), dynnet.trace() as t:
        sparse = model(x)
    skipped = torch.stack([d.rate() for d in t.decisions.values()])
    assert bool((skipped == 0).any()) and bool((skipped == 1).any())  # precondition: decisions are mixed
    calls: list[int] = []
    _counting_runs(model, calls)
    model.batch_engine = "masked"
    with torch.inference_mode():
        masked = model(x)
        one = model(x[:1])
    assert calls == [-6, -1]  # masked mode, at batch 1 too
    assert all(b.mode == "sparse" for _, b in dynnet.core.dynamic_blocks(model))  # sparse mode restored
    torch.testing.assert_close(masked, sparse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, sparse[:1], rtol=1e-5, atol=1e-5)


def test_auto_runs_masked_where_the_sparse_paths_lose(mixed, fake_clock: dict[str, float]) -> None:
    model, x = mixed
    dynnet.sparse(model)
    calls: list[int] = []
    fake_clock.update(batched=10.0, sample=5.0, masked=8.0)  # 8 < 10 (batched) and < 30 (six samples)
    _counting_runs(model, calls, fake_clock)
    with torch.inference_mode():
        model(x)
        runs = len(calls)
        model(x)
        assert calls[runs:] == [-6]
        model(x[:1])  # batch 1: batched (5) against masked (8)
        assert calls[-1] == 1
        with dynnet.trace():  # a trace records what real skipping does: the sparse path, whatever was timed
            model(x)
        assert calls[-1] == 6
