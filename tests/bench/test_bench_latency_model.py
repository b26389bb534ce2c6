"""`profile_latency` with a fake clock whose time is the executed MACs (counted by a MacCounter): the tables it fits
reproduce that law, the held-out error is ~0, the model and its state are left as they were, and the JSON lands under
the machine key."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.bench.latency_model import latency_model_path, machine_key, profile_latency
from dynnet.core.latency import REST, LatencyModel
from dynnet.macs import MacCounter
from dynnet.testing import diverse_inputs, scramble_until_mixed

pytestmark = pytest.mark.usefixtures("one_thread")

NS_PER_MAC = 1e-9  # the fake machine: one nanosecond per executed MAC, nothing else costs time


@pytest.fixture
def model() -> dynnet.DynamicModel:
    torch.manual_seed(0)
    m = dynnet.create_model("cifar_resnet8", recipe="convnet_aig", width=0.5, in_channels=1)
    scramble_until_mixed(m, diverse_inputs(8, (1, 16, 16), seed=1))
    return m


def test_profile_fits_the_clocks_law_and_predicts_held_out_decisions(model: dynnet.DynamicModel, tmp_path) -> None:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    images = diverse_inputs(16, (1, 16, 16), seed=2)
    with MacCounter() as counter:  # the clock: the MACs the aten ops executed so far (a block's time: its MACs)
        lm = profile_latency(
            model, (1, 16, 16), (1, 4), threads=1, images=images, samples=8, repeats=1, save_to=tmp_path,
            clock=lambda: NS_PER_MAC * counter.total,
        )  # fmt: skip
    # the model is as it was: weights and thresholds, modes, training flag
    assert model.training and all(b.mode == "masked" for _, b in model.blocks())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], msg=k)
    assert lm.batch_sizes == [1, 4] and lm.serve_batch == 1
    assert set(lm.parts[1]) == {name for name, _ in model.blocks()} | {REST}
    assert lm.error[1]["samples"] > 0 and lm.error[1]["median"] < 1e-9
    # each block's table is its executed MACs per sample: the gate's where it skips, the body's too where it runs
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t:
        model(images)
    by_name = {e.name: e for e in t.entries}
    for name, part in lm.parts[1].items():
        if name == REST:
            continue
        short = name.removeprefix("net.")
        assert part.entries == (f"{short}/body", f"{short}/gate")
        body, gate = by_name[f"{short}/body"].maximum, by_name[f"{short}/gate"].maximum
        assert part.table(torch.tensor([1.0])).item() >= 1e-6 * (body + gate) * (1 - 1e-9)
        assert part.table(torch.tensor([0.0])).item() < 0.1 * 1e-6 * body
    model.set_latency_model_(lm)
    with torch.no_grad(), dynnet.trace() as t:
        model(images)
    torch.testing.assert_close(t.latency(), 1e-6 * t.executed_macs(), rtol=1e-9, atol=1e-12)
    stored = latency_model_path(tmp_path, model.recipe, 1)
    assert stored.exists() and LatencyModel.load(stored).as_dict() == lm.as_dict()
    assert lm.machine == machine_key(1)


def test_profile_refuses_what_it_cannot_profile(model: dynnet.DynamicModel) -> None:
    with pytest.raises(TypeError, match="converted model"):
        profile_latency(torch.nn.Linear(2, 2), (1, 16, 16))
    with pytest.raises(ValueError, match="input_shape"):
        profile_latency(model, (16, 16))
    with pytest.raises(ValueError, match="batch_sizes"):
        profile_latency(model, (1, 16, 16), (0,))
