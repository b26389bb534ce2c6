"""Recipe-specific behaviour of the early-exit family (the conformance suite covers the shared contract)."""

from __future__ import annotations

import math

import pytest
import torch

import dynnet
from dynnet.methods.early_exit.adversarial import pgd_attack
from dynnet.methods.early_exit.early_exit_cnn import exit_fractions
from dynnet.methods.early_exit.hierarchical_exits import bag_of_features


def _x(n: int = 4, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn((n, 1, size, size), generator=g)


def _resnet8(recipe: str, **kw) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    kw.setdefault("exit_fractions", (0.01, 0.3, 0.6))
    return dynnet.create_model("cifar_resnet8", recipe=recipe, in_channels=1, **kw)


def test_msdnet_tiny_is_the_static_last_classifier() -> None:
    torch.manual_seed(0)
    model = dynnet.create_model("msdnet_tiny", recipe="msdnet", in_channels=1).eval()
    assert model.num_exits == 4
    x = _x(3, 16)
    torch.testing.assert_close(model(x), model.cascade.forward_dense(x))
    model.set_thresholds([-math.inf] * 3)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t:
        out = model(x)
    assert torch.equal(t.outputs["exit_index"], torch.zeros(3, dtype=torch.long))
    h = model.cascade.segment(0, x)
    torch.testing.assert_close(out, model.cascade.classifiers[0](h[-1]))
    assert len(h) == 3  # three scales after the first block


def _msd_grads(recipe: str, **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = dynnet.create_model("msdnet_tiny", recipe=recipe, in_channels=1, **kw).train()
    x, y = _x(4, 16), torch.arange(4)
    with dynnet.trace() as t:
        model(x)
    exits = model.exit_outputs(t)
    torch.nn.functional.cross_entropy(exits[0], y).backward()  # only the first classifier's loss
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_imta_gradient_equilibrium_scales_the_first_exit_gradient_by_one_over_k() -> None:
    plain = _msd_grads("imta", gradient_equilibrium=False, inline_collaboration=False)
    ge = _msd_grads("imta", gradient_equilibrium=True, inline_collaboration=False)
    # The first classifier's own weights see an unscaled gradient; the shared block before it sees 1/K of it.
    name = "net.classifiers.0.fc.weight"
    torch.testing.assert_close(ge[name], plain[name])
    block = "net.blocks.0.0.regular.2.1.0.weight"  # coarsest scale of the first block (feeds classifier 0)
    torch.testing.assert_close(ge[block], plain[block] / 4, rtol=1e-4, atol=1e-7)


def test_imta_starts_as_msdnet_and_distills_from_the_last_exit() -> None:
    torch.manual_seed(0)
    imta = dynnet.create_model("msdnet_tiny", recipe="imta", in_channels=1).eval()
    torch.manual_seed(0)
    msd = dynnet.create_model("msdnet_tiny", recipe="msdnet", in_channels=1).eval()
    x = _x(2, 16)
    with torch.no_grad(), dynnet.trace() as ti:
        imta(x)
    with torch.no_grad(), dynnet.trace() as tm:
        msd(x)
    for a, b in zip(imta.exit_outputs(ti), msd.exit_outputs(tm), strict=True):
        torch.testing.assert_close(a, b)
    loss = imta.compute_loss(imta.exit_outputs(ti)[-1], torch.tensor([1, 2]), ti)
    assert set(loss.parts) == {"final", "ce", "distill"}


def test_dynexit_thresholds_learn_from_the_budget() -> None:
    model = _resnet8("dynexit", initial_threshold=0.12).train()
    with dynnet.trace() as t:
        logits = model(_x())
    model.compute_loss(logits, torch.arange(4), t).total.backward(retain_graph=True)
    grad = model.cascade.gates.threshold.grad
    assert grad is not None and bool((grad != 0).any())
    # Under a budget of 0.9 (most samples stop early here): raising the thresholds lowers the budget loss.
    fraction = float(t.mac_fraction().detach().mean())
    assert fraction < 0.9
    (g,) = torch.autograd.grad(t.budget_loss(0.9), model.cascade.gates.threshold)
    assert float(g.sum()) < 0


def test_cdl_classifiers_do_not_train_the_base() -> None:
    model = _resnet8("cdl", train_base=False).train()
    with dynnet.trace() as t:
        logits = model(_x())
    model.compute_loss(logits, torch.arange(4), t).total.backward()
    assert float(model.cascade.conv1.weight.grad.abs().sum()) == 0.0
    assert float(model.cascade.exits[0].fc.weight.grad.abs().sum()) > 0.0


def test_adaptive_nn_policy_loss_reaches_only_the_policies() -> None:
    grads = {}
    for weight in (0.0, 1.0):
        model = _resnet8("adaptive_nn", policy_weight=weight).train()
        with dynnet.trace() as t:
            logits = model(_x())
        model.compute_loss(logits, torch.arange(4), t).total.backward()
        grads[weight] = (model.cascade.conv1.weight.grad.clone(), model.cascade.policy[0].fc.weight.grad)
    torch.testing.assert_close(grads[1.0][0], grads[0.0][0])  # the trunk ignores the policies' loss
    assert grads[0.0][1] is None or float(grads[0.0][1].abs().sum()) == 0.0
    assert float(grads[1.0][1].abs().sum()) > 0.0


def test_eenet_exit_distributions() -> None:
    assert exit_fractions("linear", 3) == pytest.approx((0.25, 0.5, 0.75))
    assert exit_fractions("quadratic", 3) == pytest.approx((0.0625, 0.25, 0.5625))
    assert exit_fractions("pareto", 2) == pytest.approx((0.2, 0.36))
    assert exit_fractions("golden", 1)[0] == pytest.approx(1 - 0.6180339887)
    with pytest.raises(ValueError):
        exit_fractions("fine", 3)


def test_eenet_loss_is_mixture_plus_cost() -> None:
    torch.manual_seed(0)
    model = dynnet.create_model(
        "cifar_resnet8", recipe="early_exit_cnn", in_channels=1, distribution="linear", num_early=2,
        exit_ce_weight=0.0, cost_weight=0.0,
    ).train()  # fmt: skip
    y = torch.arange(4)
    with dynnet.trace() as t:
        model(_x())
    exits = model.exit_outputs(t)
    # Fresh confidence branches say "continue" (h ≈ 0.0025): the mixture is (almost) the last exit.
    loss = model.compute_loss(exits[-1], y, t)
    assert loss.parts["mixture"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(exits[-1], y).detach()), rel=0.05
    )


def test_bag_of_features_histograms_sum_to_one() -> None:
    h = torch.randn(3, 8, 5, 5)
    s = bag_of_features(h, torch.randn(6, 8))
    assert s.shape == (3, 6)
    torch.testing.assert_close(s.sum(1), torch.ones(3))


def test_hierarchical_exits_carry_the_aggregated_histogram() -> None:
    model = _resnet8("hierarchical_exits").eval()
    x = _x()
    c = model.cascade
    with torch.no_grad():
        h0 = c.segment(0, x)
        _, s0 = c.exit_logits(0, h0, None)
        h1 = c.segment(1, h0)
        z1, s1 = c.exit_logits(1, h1, s0)
        own = bag_of_features(h1, c.exits[1].codebook)
    torch.testing.assert_close(s1, 0.5 * own + 0.5 * s0)  # β = sigmoid(0) = 0.5 at conversion
    torch.testing.assert_close(z1, c.exits[1].fc(s1 * s1.shape[1]))


def test_pgd_stays_in_the_ball_and_increases_the_loss() -> None:
    w = torch.randn(10, 1 * 16 * 16)
    x = _x()
    y = torch.arange(4)

    def loss(inp: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(inp.flatten(1) @ w.T, y)

    adv = pgd_attack(loss, x, epsilon=0.05, step_size=0.02, steps=5, random_start=False)
    assert float((adv - x).abs().max()) <= 0.05 + 1e-6
    assert float(loss(adv)) > float(loss(x))


def test_triple_wins_trains_on_clean_and_adversarial_inputs() -> None:
    model = _resnet8("triple_wins", steps=1).train()
    with dynnet.trace() as t:
        logits = model(_x())
    assert "input" in t.outputs
    out = model.compute_loss(logits, torch.arange(4), t)
    assert set(out.parts) == {"clean", "adversarial"}
    assert out.parts["adversarial"] >= out.parts["clean"] - 1e-3
    assert model.training and model.cascade.mode == "masked"
