"""Budgets of the channel family: the knob that calibration moves reaches every inference path (the compiled batch-1
calls and their cached plans included), the paper knobs derived from the budget, and their state."""

from __future__ import annotations

import copy

import pytest
import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.methods.channel._block import ChannelGatedBlock
from dynnet.methods.channel._budget import block_phases, kept_channels
from dynnet.methods.channel.channel_gating import GatedBasicBlock
from dynnet.testing import diverse_inputs, scramble_until_mixed
from dynnet.testing.engines import kernel_engine

CHANNEL_RECIPES = dynnet.list_recipes("channel")
SHAPE = (3, 16, 16)
BUDGET = 0.65  # inside every channel recipe's reachable range


def _model(recipe: str, **config) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe=recipe, num_classes=10, in_channels=3, **config)


def _untraced_sparse(model: dynnet.DynamicModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch, single)``: untraced sparse inference at batch N and one sample at a time (compiled calls)."""
    dynnet.sparse(model.eval())
    with torch.inference_mode():
        return model(x), torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])


@pytest.mark.parametrize("recipe", CHANNEL_RECIPES)
def test_calibration_reaches_the_compiled_batch1_paths_and_the_batch_path(recipe: str) -> None:
    """Plans and folded caches are built before calibrating; after it, sparse mode at batch 1 (one compiled call
    per block, with nothing recording) and at batch N equals masked mode, and spends what the trace says."""
    with kernel_engine("native"):
        model = _model(recipe)
        x = diverse_inputs(24, SHAPE, seed=4)
        scramble_until_mixed(model, x[:8])
        before, _ = _untraced_sparse(model, x)  # fills the plans and caches with the pre-calibration knob
        report = dynnet.calibrate(model, x, BUDGET, tolerance=0.02)
        assert report.within_tolerance, report.summary()
        assert abs(report.before - report.mac_fraction) > 0.02, "the knob should have moved"
        batch, single = _untraced_sparse(model, x)
        dynnet.set_mode(model, "masked")
        with torch.no_grad(), dynnet.trace() as tm:
            masked = model(x)
        torch.testing.assert_close(batch, masked, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(batch, before, rtol=1e-4, atol=1e-4)
        blocks = [m for m in model.modules() if isinstance(m, ChannelGatedBlock | GatedBasicBlock)]
        assert blocks and all(b._plan is not None for b in blocks), "the batch-1 compiled calls ran"
        dynnet.sparse(model)
        with torch.no_grad(), dynnet.trace() as ts:
            model(x)
        assert float(ts.mac_fraction().mean()) == pytest.approx(report.mac_fraction, abs=1e-9)
        torch.testing.assert_close(ts.macs(), tm.macs())
        for i in range(3):  # the compiled call executes the calibrated decision's MACs
            with torch.inference_mode():
                with MacCounter() as counter:
                    model(x[i : i + 1])
                with dynnet.trace() as t1:
                    model(x[i : i + 1])
            assert counter.total == pytest.approx(float(t1.macs()[0]), abs=0.5)
            assert float(t1.macs()[0]) == pytest.approx(float(ts.macs()[i]), abs=0.5)


@pytest.mark.parametrize("recipe", CHANNEL_RECIPES)
def test_calibration_round_trips_into_a_fresh_conversion_on_the_compiled_path(recipe: str) -> None:
    with kernel_engine("native"):
        model = _model(recipe)
        x = diverse_inputs(16, SHAPE, seed=4)
        scramble_until_mixed(model, x[:8])
        dynnet.calibrate(model, x, BUDGET, tolerance=0.03)
        other = _model(recipe)
        _untraced_sparse(other, x[:2])  # the fresh model's plans, built before loading
        other.load_state_dict(copy.deepcopy(model.state_dict()))
        torch.testing.assert_close(_untraced_sparse(other, x)[1], _untraced_sparse(model, x)[1])


@pytest.mark.parametrize("recipe", ["fbs", "dynamic_channel_exec"])
def test_budget_derives_the_kept_fraction(recipe: str) -> None:
    """FBS's density and DCX's k are derived at conversion: the MAC fraction on a 32×32 input is the budget up to one
    channel step, and budget 1 keeps every channel (the base network)."""
    x = diverse_inputs(4, (3, 32, 32))
    fractions = []
    for budget in (0.3, 0.5, 0.75, 1.0):
        model = dynnet.sparse(_model(recipe, budget=budget).eval())
        with torch.no_grad(), dynnet.trace() as t:
            model(x)
        fraction = float(t.mac_fraction().mean())
        assert fraction == pytest.approx(budget, abs=0.015)
        fractions.append(fraction)
    assert fractions == sorted(fractions)
    if recipe == "fbs":
        assert all(b.density == 1.0 for b in model.fbs_blocks())
    else:
        assert all(int(b.keep) == b.channels for b in model.bandits())


def test_kept_channels_interleave_the_blocks_steps() -> None:
    phases = block_phases(3)
    assert phases == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    assert [kept_channels(0.5, c, p) for c, p in zip((16, 32, 64), phases, strict=True)] == [8, 16, 32]
    assert [kept_channels(1.0, 16, p) for p in phases] == [16] * 3
    assert [kept_channels(0.0, 16, p) for p in phases] == [1] * 3
    # the three blocks of 16 channels step at different fractions
    steps = [min(f / 1000 for f in range(1001) if kept_channels(f / 1000, 16, p) == 9) for p in phases]
    assert len(set(steps)) == 3


def test_fbs_density_is_a_buffer_that_survives_state_dict_and_reproduces_the_base_only_at_budget_one() -> None:
    base = dynnet.create_model("cifar_resnet8", num_classes=10)
    x = diverse_inputs(3, SHAPE)
    torch.manual_seed(0)
    full = dynnet.convert(copy.deepcopy(base), "fbs")
    with torch.no_grad():
        torch.testing.assert_close(full.eval()(x), base.eval()(x), rtol=1e-5, atol=1e-5)
    part = dynnet.convert(copy.deepcopy(base), "fbs", budget=0.5)
    assert all(0 < b.density < 1 for b in part.fbs_blocks())
    keys = [k for k in part.state_dict() if k.endswith("density")]
    assert len(keys) == 3 and all(k.endswith(".saliency.density") for k in keys)
    full.load_state_dict(part.state_dict())
    assert [b.density for b in full.fbs_blocks()] == [b.density for b in part.fbs_blocks()]
    with pytest.raises(ValueError, match="density"):
        full.set_density(1.5)


@pytest.mark.parametrize("recipe", ["rnp", "runtime_routing"])
def test_agent_penalty_follows_the_budget_in_training(recipe: str) -> None:
    """Dual ascent: the reward's penalty rises while the batch spends more than the budget, falls (not below 0)
    while it spends less, and stays fixed with ``penalty_rate = 0``."""
    x, y = diverse_inputs(6, SHAPE), torch.arange(6) % 10
    penalties = {}
    for budget, rate in ((0.6, 0.5), (1.0, 0.5), (0.6, 0.0)):
        model = _model(recipe, budget=budget, penalty_rate=rate).train()  # fresh: every block keeps all (≈ 1.0)
        with dynnet.trace() as t:
            logits = model(x)
        fraction = float(t.mac_fraction().mean())  # below 1 where exploration took a smaller action
        loss = model.compute_loss(logits, y, t)
        penalties[(budget, rate)] = float(model.penalty)
        assert loss.parts["penalty"] == pytest.approx(float(model.penalty))
        assert float(model.penalty) == pytest.approx(max(0.0, 0.1 + rate * (fraction - budget)))
    assert penalties[(0.6, 0.5)] > 0.1 and penalties[(0.6, 0.5)] > penalties[(1.0, 0.5)]
    assert penalties[(0.6, 0.0)] == pytest.approx(0.1)
    model.eval()
    with dynnet.trace() as t:
        logits = model(x)
    model.compute_loss(logits, y, t)
    assert float(model.penalty) == pytest.approx(0.1), "evaluation leaves the penalty alone"


def test_instance_sparsity_decay_is_trimmed_by_the_budget() -> None:
    x, y = diverse_inputs(4, SHAPE), torch.arange(4)
    decays = {}
    for budget in (0.5, 0.75, 1.0):
        model = _model("instance_sparsity", budget=budget, decay_weight=1e-2).train()
        with dynnet.trace() as t:
            logits = model(x)
        loss = model.compute_loss(logits, y, t)
        decays[budget] = loss.parts["feature_decay"]
        loss.total.backward()
    assert decays[0.5] > decays[0.75] > decays[1.0] == 0.0  # a smaller budget decays more channels; 1: none
