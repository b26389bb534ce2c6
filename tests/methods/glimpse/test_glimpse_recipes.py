"""RAM, GFNet and DCN: stopping really removes samples, exact per-part MACs, objectives reach every module."""

import pytest
import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.methods.glimpse.dcn import PATCH, entropy_saliency, select_cells
from dynnet.testing.scramble import randomise


def _create(recipe: str, **kw: object) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe=recipe, in_channels=1, **kw).eval()


def _x(n: int, side: int) -> torch.Tensor:
    return torch.randn((n, 1, side, side), generator=torch.Generator().manual_seed(3))


# -- RAM ----------------------------------------------------------------------------------------------
def test_ram_halting_everyone_after_one_glimpse_costs_one_step() -> None:
    model = _create("ram")
    with torch.no_grad():
        model.net.halting.bias.fill_(8.0)  # P(stop) ~ 1
    dynnet.sparse(model)
    x = _x(4, 32)
    with torch.no_grad(), dynnet.trace() as t, MacCounter() as counter:
        model(x)
    first, _, heads, _ = model.net.step_costs(x)
    classifier = 128 * 10
    expected = torch.full((4,), float(first + heads + classifier), dtype=torch.float64)
    torch.testing.assert_close(t.executed_macs(), expected)
    assert counter.total == 4 * (first + heads + classifier)
    assert (t.outputs["ram/glimpses"] == 1).all()


def test_ram_open_halting_takes_every_glimpse_and_matches_dense() -> None:
    model = _create("ram", max_glimpses=4)
    x = _x(3, 32)
    with torch.no_grad(), dynnet.trace() as t:
        y = model(x)
    assert (t.outputs["ram/glimpses"] == 4).all()
    dynnet.set_mode(model, "dense")
    torch.testing.assert_close(model(x), y)


def test_ram_reinforce_reaches_policy_and_halting() -> None:
    model = _create("ram").train()
    x, y = _x(6, 32), torch.arange(6)
    with dynnet.trace() as t:
        logits = model(x)
    out = model.compute_loss(logits, y, t)
    out.total.backward()
    assert set(out.parts) == {"task", "policy", "baseline"}
    for m in (model.net.policy, model.net.halting, model.net.baseline):
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0


# -- GFNet --------------------------------------------------------------------------------------------
def test_gfnet_exit_at_glance_runs_only_the_global_encoder() -> None:
    model = _create("gfnet")
    with torch.no_grad():
        model.net.thresholds.fill_(0.0)  # everyone is confident enough after the glance
    x = _x(3, 64)
    with torch.no_grad():
        _, glance_logits = model.net.glance(x)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t, MacCounter() as counter:
        out = model(x)
    torch.testing.assert_close(out, glance_logits)
    glance, _, policy, _ = model.net._costs(x)
    assert counter.total == 3 * (glance + policy)
    torch.testing.assert_close(t.executed_macs(), t.macs())


def test_gfnet_calibrated_exits_mix_and_sparse_equals_masked() -> None:
    model = _create("gfnet", max_steps=3)
    x = _x(12, 64)
    model.calibrate(model.step_confidences(x), torch.tensor([0.3, 0.3, 0.4]))
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    steps = 1 + sum(d.hard for d in tm.decisions.values())
    assert set(steps.tolist()) == {1.0, 2.0, 3.0}
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as counter:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-5)
    assert counter.total == pytest.approx(float(ts.executed_macs().sum()), abs=0.5)
    glance, focus, policy, _ = model.net._costs(x)
    expected = glance + policy + (steps >= 2).double() * (focus + policy) + (steps >= 3).double() * focus
    torch.testing.assert_close(ts.macs(), expected.double())


def test_gfnet_reward_is_the_gain_in_true_class_probability() -> None:
    model = _create("gfnet", max_steps=2).train()
    x, y = _x(6, 64), torch.arange(6)
    with dynnet.trace() as t:
        logits = model(x)
    out = model.compute_loss(logits, y, t)
    out.total.backward()
    assert model.net.policy.weight.grad.abs().sum() > 0
    assert model.net.local_encoder.conv1.weight.grad.abs().sum() > 0


# -- DCN ----------------------------------------------------------------------------------------------
def test_dcn_fine_network_is_patch_local() -> None:
    model = _create("dcn")
    x = _x(2, 32)
    with torch.no_grad():
        full = model.net.fine(x)
        patch = model.net.fine(x[:, :, PATCH : 2 * PATCH, 2 * PATCH : 3 * PATCH])
    torch.testing.assert_close(patch[:, :, 0, 0], full[:, :, 1, 2])


def test_dcn_saliency_is_the_entropy_gradient_norm() -> None:
    model = _create("dcn")
    coarse = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    sal, _ = entropy_saliency(model.net.top, coarse)
    c = coarse.clone().requires_grad_()
    p = model.net.top(c).softmax(1)
    (-(p * p.log()).sum()).backward()
    torch.testing.assert_close(sal, c.grad.norm(dim=1).flatten(1))
    chosen = select_cells(torch.tensor([[1.0, 2.0, 3.0, 6.0]]), 1.0, None)
    assert chosen.tolist() == [[False, False, True, True]]
    assert select_cells(torch.tensor([[1.0, 2.0, 3.0, 6.0]]), 0.0, 1).tolist() == [[False, False, False, True]]


def test_dcn_sparse_runs_fine_only_on_chosen_patches() -> None:
    model = _create("dcn")
    x = _x(5, 32)
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    count = tm.decisions["dcn/cells"].hard.sum(1).double()
    assert 0 < float(count.mean()) < 16
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as counter:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-5)
    c, top, fine, cells = model.net._costs(x, torch.empty(1, 32, 4, 4))
    torch.testing.assert_close(ts.executed_macs(), c + 2 * top + count * fine)
    assert counter.total == pytest.approx(float(ts.executed_macs().sum()), abs=0.5)
    assert cells == 16


# -- budgets ------------------------------------------------------------------------------------------
def test_ram_fixed_glimpses_are_derived_from_the_budget() -> None:
    counts = []
    for budget in (0.2, 0.5, 0.8, 1.0):
        model = _create("ram", learn_stopping=False, budget=budget)
        fractions = model.net.stop_fractions(_x(1, 32))
        limit = int(model.net.glimpse_limit)
        assert limit == int((fractions - budget).abs().argmin()) + 1
        with torch.no_grad(), dynnet.trace() as t:
            model(_x(3, 32))
        assert (t.outputs["ram/glimpses"] == limit).all()
        assert float(t.mac_fraction()[0]) == pytest.approx(float(fractions[limit - 1]))
        counts.append(limit)
    assert counts == sorted(counts) and counts[0] < counts[-1] == 6
    report = dynnet.calibrate(model, _x(4, 32), 0.5, tolerance=0.2)  # the knob is the number of glimpses
    assert int(model.net.glimpse_limit) == round(report.thresholds["number of glimpses"]) < 6


def test_ram_calibration_sets_per_glimpse_stop_thresholds_on_p_stop() -> None:
    model = _create("ram")
    randomise(model, torch.Generator().manual_seed(1))
    x = _x(64, 32)
    report = dynnet.calibrate(model, x, 0.5)
    assert report.within_tolerance and model.net.stop_thresholds.shape == (5,)
    p_stop = model.net.stop_probabilities(x)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    stops = torch.cat([p_stop >= model.net.stop_thresholds, torch.ones(64, 1, dtype=torch.bool)], 1)
    torch.testing.assert_close(t.outputs["ram/glimpses"], stops.int().argmax(1).float() + 1)


def test_ram_reward_charges_only_the_macs_above_the_budget() -> None:
    model = _create("ram").train()
    x, y = _x(6, 32), torch.arange(6)
    with dynnet.trace() as t:
        logits = model(x)
    correct = (logits.argmax(1) == y).float()
    fractions = t.outputs["ram/stop_fractions"]
    f = fractions[t.outputs["ram/glimpses"].long() - 1].float()
    assert float(fractions[-1]) == 1.0
    torch.testing.assert_close(model.reward(logits, y, t, budget=1.0), correct)
    torch.testing.assert_close(model.reward(logits, y, t, budget=0.3), correct - 0.05 * (f - 0.3).clamp_min(0))


def test_gfnet_step_losses_are_weighted_by_the_budget_profile() -> None:
    model = _create("gfnet", max_steps=3).train()
    x, y = _x(4, 64), torch.arange(4)
    with dynnet.trace() as t:
        logits = model(x)
    fractions = t.outputs["gfnet/exit_fractions"]
    torch.testing.assert_close(fractions, model.net.exit_costs(x) / model.net.exit_costs(x)[-1])
    low, high = model.exit_weights(fractions, 0.4), model.exit_weights(fractions, 0.9)
    assert float(low.mean()) == pytest.approx(1.0) and float(high.mean()) == pytest.approx(1.0)
    assert low[0] > high[0] and low[-1] < high[-1]
    assert model.compute_loss(logits, y, t, budget=0.4).total != model.compute_loss(logits, y, t, budget=0.9).total


def test_gfnet_calibration_hits_the_budget_with_confidence_thresholds() -> None:
    model = _create("gfnet", max_steps=3)
    randomise(model, torch.Generator().manual_seed(0))
    x = _x(48, 64)
    report = dynnet.calibrate(model, x, 0.6)
    assert report.within_tolerance and torch.isfinite(model.net.thresholds).any()
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    assert float(t.mac_fraction().mean()) == pytest.approx(report.mac_fraction)


def test_lsts_calibration_offset_lives_in_the_gate_bias() -> None:
    model = _create("lsts")
    with torch.no_grad():
        model.net.gate.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
        model.net.gate.bias.zero_()
    before = model.net.gate.bias.clone()
    report = dynnet.calibrate(model, _x(32, 32), 0.5, tolerance=0.05)
    assert report.within_tolerance
    torch.testing.assert_close(model.net.gate.bias, before + model.calibration[0].float())


def test_dcn_training_refines_the_top_k_cells_that_the_budget_pays_for() -> None:
    x = _x(3, 32)
    ks = []
    for budget in (0.3, 0.5, 0.8):
        model = _create("dcn", budget=budget).train()
        coarse = torch.empty(1, 32, 4, 4)
        c, top, fine, cells = model.net._costs(x, coarse)
        k = model.net.patches_for_budget(x, coarse)
        assert abs((c + 2 * top + k * fine) / (cells * fine + top) - budget) <= fine / (cells * fine + top) / 2 + 1e-9
        with dynnet.trace() as t:
            model(x)
        assert (t.decisions["dcn/cells"].hard.sum(1) == k).all()
        ks.append(k)
    assert ks == sorted(ks) and ks[0] < ks[-1]


def test_dcn_saliency_threshold_knob_and_padding() -> None:
    model = _create("dcn")
    randomise(model, torch.Generator().manual_seed(0))
    x = _x(32, 32)
    report = dynnet.calibrate(model, x, 0.5)
    assert report.within_tolerance
    assert float(model.net.saliency_threshold) == pytest.approx(report.thresholds["saliency threshold"])
    odd = _x(2, 28)  # Fashion-MNIST-sized images are zero-padded to 32 × 32
    with torch.no_grad():
        torch.testing.assert_close(model(odd), model(torch.nn.functional.pad(odd, (0, 4, 0, 4))))
