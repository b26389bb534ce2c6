"""Recipe-level behaviour of the channel family beyond the conformance suite (non-default settings, oracles)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dynnet
from dynnet.convert import find_adapter
from dynnet.core import Decision
from dynnet.macs import MacCounter
from dynnet.methods.channel._agent import nested_group_masks, path_masks
from dynnet.methods.channel.fbs import winners_take_all
from dynnet.methods.channel.gaternet import _GatedBlock
from dynnet.models.cifar_resnet import BasicBlock
from dynnet.testing import diverse_inputs, scramble_until_mixed

CHANNEL_RECIPES = dynnet.list_recipes("channel")


def _model(recipe: str, **config) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe=recipe, num_classes=10, **config)


def _sparse_matches_masked(model: dynnet.DynamicModel, x: torch.Tensor) -> None:
    scramble_until_mixed(model, x)
    model.eval()
    dynnet.set_mode(model, "masked")
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as counter:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ts.macs(), tm.macs())
    assert ts.executed_macs().sum().item() == pytest.approx(counter.total, abs=0.5)
    assert (ts.macs() < ts.dense_macs()).any(), "scrambled gates should save MACs for some input"


def test_family_registers_its_recipes() -> None:
    assert {
        "batch_shaping",
        "fbs",
        "gaternet",
        "instance_sparsity",
        "rnp",
        "runtime_routing",
        "stochastic_neurons",
    } <= set(CHANNEL_RECIPES)


@pytest.mark.parametrize(
    "estimator", ["straight_through_identity", "stochastic_times_smooth", "noisy_rectifier", "unbiased"]
)
def test_stochastic_neuron_estimators_run_sparse(estimator: str) -> None:
    model = _model("stochastic_neurons", estimator=estimator)
    x = diverse_inputs(6, (3, 16, 16))
    _sparse_matches_masked(model, x)
    model.train()
    with dynnet.trace() as t:
        logits = model(x)
    loss = model.compute_loss(logits, torch.arange(6) % 10, t)
    loss.total.backward()
    gate_grads = [p.grad for n, p in model.named_parameters() if ".gate." in n]
    assert all(g is not None for g in gate_grads)
    if estimator == "unbiased":
        assert "policy" in loss.parts


def test_unknown_estimator_is_rejected() -> None:
    with pytest.raises(ValueError, match="estimator"):
        _model("stochastic_neurons", estimator="magic")


def test_block_macs_follow_active_channels_exactly() -> None:
    base = BasicBlock(4, 8, stride=2).eval()
    block = _GatedBlock(base, find_adapter(base), None, strategy="groups").eval()
    block.block_name = "b"
    x = torch.randn(3, 4, 10, 10)
    hard = torch.zeros(3, 8)
    hard[0, :3] = 1
    hard[1, :] = 1
    d = Decision(hard=hard, soft=None, granularity="channel")
    for mode in ("masked", "sparse"):
        block.mode = mode
        with torch.no_grad(), dynnet.trace() as t:
            block(x, d, hard)
        # conv1: 9·4·25 MACs per output channel; conv2: 9·8·25 per input channel.
        per_channel = 9 * 4 * 25 + 9 * 8 * 25
        torch.testing.assert_close(t.macs(), torch.tensor([3.0, 8.0, 0.0], dtype=torch.float64) * per_channel)
        if mode == "sparse":
            torch.testing.assert_close(t.executed_macs(), t.macs())


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.integers(1, 24).flatmap(
        lambda c: st.tuples(
            st.lists(
                st.lists(st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0]), min_size=c, max_size=c), min_size=1, max_size=4
            ),
            st.integers(1, c),
        )
    )
)
def test_winners_take_all_is_the_top_k_of_a_stable_ranking(case: tuple[list[list[float]], int]) -> None:
    """k-WTA (sorted values, comparisons and a cumsum, which the ONNX exporter takes) keeps exactly what ranking by a
    stable sort keeps: the k largest, ties to the lowest index; bit for bit, with k an int or a 0-dim tensor."""
    rows, k = case
    g = torch.tensor(rows)
    order = torch.sort(g, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(g.shape[1]).expand_as(order))
    expected = g * (rank < k)
    for kk in (k, torch.tensor(float(k), dtype=torch.float64)):
        out = winners_take_all(g, kk)
        assert torch.equal(out, expected) and torch.equal(out.signbit(), expected.signbit())


def test_fbs_keeps_k_channels_and_executes_exactly_the_theoretical_macs() -> None:
    g = torch.tensor([[0.1, 0.5, 0.3, 0.0], [1.0, 0.0, 0.0, 2.0]])
    torch.testing.assert_close(winners_take_all(g, 2), torch.tensor([[0.0, 0.5, 0.3, 0.0], [1.0, 0.0, 0.0, 2.0]]))
    model = _model("fbs")
    model.set_density(0.5)  # k = C / 2 in every block (16, 32, 64 channels)
    x = diverse_inputs(5, (3, 16, 16))
    with torch.no_grad(), dynnet.trace() as t:
        dynnet.sparse(model)(x)
    for d in t.decisions_of("channel").values():
        assert (d.hard.sum(1) == d.hard.shape[1] // 2).all()
    torch.testing.assert_close(t.executed_macs(), t.macs())  # the padded strategy wastes nothing
    _sparse_matches_masked(model, x)


def test_action_tables() -> None:
    assert nested_group_masks(8, 4).sum(1).tolist() == [2, 4, 6, 8]
    assert nested_group_masks(8, 4)[1].tolist() == [True] * 4 + [False] * 4
    paths = path_masks(6, 2)
    assert paths.tolist() == [[True] * 3 + [False] * 3, [False] * 3 + [True] * 3, [True] * 6]


@pytest.mark.parametrize("recipe", ["rnp", "runtime_routing"])
def test_agent_recipes_choose_from_their_action_table(recipe: str) -> None:
    model = _model(recipe)
    x = diverse_inputs(6, (3, 16, 16))
    _sparse_matches_masked(model, x)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    for i, d in enumerate(t.decisions_of("channel").values()):
        table = model.masks_of(i).to(d.hard.dtype)
        assert all(any(torch.equal(row, m) for m in table) for row in d.hard)
    model.train()
    with dynnet.trace() as t:
        logits = model(x)
    loss = model.compute_loss(logits, torch.arange(6) % 10, t)
    loss.total.backward()
    assert loss.parts["q"] > 0
    assert model.controller.decoder.weight.grad is not None


def test_instance_sparsity_threshold_trades_macs() -> None:
    model = _model("instance_sparsity", decay_weight=1e-2)
    x = diverse_inputs(4, (3, 16, 16))
    fractions = []
    for ratio in (0.0, 0.5, 1.0, 2.0):
        model.set_threshold(ratio)
        with torch.no_grad(), dynnet.trace() as t:
            dynnet.sparse(model)(x)
        fractions.append(float(t.mac_fraction().mean()))
        assert (t.macs() >= t.min_macs() - 0.5).all()
    assert fractions == sorted(fractions, reverse=True) and fractions[-1] < fractions[0]
    model.set_threshold(1.0)
    _sparse_matches_masked(model, x)
    model.train()
    with dynnet.trace() as t:
        logits = model(x)
    assert "feature_decay" in model.compute_loss(logits, torch.arange(4), t).parts


def test_batch_shaping_objective_has_its_terms() -> None:
    model = _model("batch_shaping", budget=0.6).train()
    x = diverse_inputs(6, (3, 16, 16))
    with dynnet.trace() as t:
        logits = model(x)
    loss = model.compute_loss(logits, torch.arange(6) % 10, t)
    assert {"task", "batch_shaping", "l0", "budget"} <= set(loss.parts)
    assert loss.parts["batch_shaping"] > 0  # open gates are far from a Beta(0.6, 0.4) spread


@pytest.mark.parametrize("recipe", CHANNEL_RECIPES)
def test_base_weights_keep_their_names(recipe: str) -> None:
    torch.manual_seed(0)
    base = dynnet.create_model("cifar_resnet8", num_classes=10)
    model = dynnet.convert(base, recipe)
    added = set(model.net.state_dict()) - set(base.state_dict())
    assert set(base.state_dict()) <= set(model.net.state_dict())
    assert all({"gate", "saliency"} & set(k.split(".")) for k in added), added


@pytest.mark.parametrize("tile", [1, 2])
def test_channel_gating_conv_macs_and_tiles(tile: int) -> None:
    from dynnet.methods.channel.channel_gating import GatedConv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, 3, 1, 1, bias=False)
    gated = GatedConv(conv, groups=4, tile=tile).eval()
    gated.block_name = "c"
    with torch.no_grad():
        gated.gate.threshold.normal_()
    x = torch.randn(3, 8, 6, 6)
    outs = {}
    for mode in ("masked", "sparse"):
        gated.mode = mode
        with torch.no_grad(), dynnet.trace() as t, MacCounter() as counter:
            outs[mode] = gated(x)
        d = next(iter(t.decisions.values()))
        # Analytic: base = 2 of 8 input channels for every output; the rest (6 channels · 9) per active entry.
        base = 6 * 36 * 2 * 9
        torch.testing.assert_close(t.macs(), base + d.hard.flatten(1).sum(1).double() * 6 * 9)
        assert t.executed_macs().sum().item() == counter.total
        if tile == 2:
            h = d.hard
            assert torch.equal(h[:, :, 0::2, 0::2], h[:, :, 1::2, 1::2])  # one decision per 2×2 window
    torch.testing.assert_close(outs["sparse"], outs["masked"], rtol=1e-5, atol=1e-5)
    gated.mode = "dense"
    torch.testing.assert_close(gated(x), conv(x))


def test_gaternet_training_counts_the_binary_sample_of_each_gate() -> None:
    """In training a filter counts as spent when its noisy logit is positive (the rule inference applies without the
    noise), not whenever its relaxed value is above 0."""
    model = _model("gaternet").train()
    with torch.no_grad():
        model.gate.fc.weight.zero_()
        model.gate.fc.bias.fill_(-1.5)
    torch.manual_seed(1)
    with dynnet.trace() as t:
        model(diverse_inputs(16, (3, 16, 16)))
    hard = torch.cat([d.hard.detach().flatten() for d in t.decisions_of("channel").values()])
    assert hard.numel() > 1000
    # P(-1.5 + N(0, 1) > 0) = 0.067; the relaxed-above-0 rule gave about 0.44
    assert 0.03 < float(hard.mean()) < 0.12


def test_gaternet_builds_on_a_base_of_any_width() -> None:
    """The base network's ``width`` multiplier is not taken for a GaterNet setting (``gater_width`` is its own)."""
    from dynnet.train import build_model

    model = build_model("cifar_resnet8", "gaternet", in_channels=1, num_classes=10, width=0.5, gater_width=8)
    assert model.net.conv1.out_channels == 8 and model.gate.features[0].out_channels == 8
    full = build_model("cifar_resnet8", "gaternet", in_channels=1, num_classes=10, width=1.0)
    assert full.net.conv1.out_channels == 16
