"""Sparse MoE: noisy top-k gating, zero experts, balancing losses, dispatch == weighted sum, exact MACs, capacity,
load stats, budget."""

import math

import pytest
import torch

import dynnet
from dynnet.losses.moe_balance import cv_squared, importance_loss, load_loss, prob_in_top_k
from dynnet.macs import MacCounter
from dynnet.methods.moe.sparse_moe import MoEResidual, noisy_top_k_gating, with_zero_experts
from dynnet.testing import scramble_gates

BASE = "cifar_resnet8"
SHAPE = (3, 32, 32)


def _model(**config: object) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model(BASE, recipe="sparse_moe", **config)


def _x(n: int = 8) -> torch.Tensor:
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(2))


def test_noisy_top_k_gating_keeps_k_and_normalises() -> None:
    clean = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    gates, index, logits = noisy_top_k_gating(clean, None, 2)
    assert torch.equal(logits, clean)
    assert ((gates > 0).sum(1) == 2).all()
    torch.testing.assert_close(gates.sum(1), torch.ones(5))
    top = clean.topk(2, 1)
    torch.testing.assert_close(gates.gather(1, index), top.values.softmax(1))


def test_cv_squared_and_importance_analytic() -> None:
    assert float(cv_squared(torch.tensor([1.0, 1.0, 1.0]))) == pytest.approx(0.0)
    assert float(cv_squared(torch.tensor([0.0, 2.0]))) == pytest.approx(1.0)  # var 1, mean 1
    gates = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert float(importance_loss(gates)) == pytest.approx(1.0)


def test_prob_in_top_k_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.tensor([[0.3, 0.0, -0.2, 0.1]])
    std = torch.tensor([[0.5, 0.7, 0.4, 0.6]])
    noisy = clean + torch.randn(clean.shape, generator=g) * std
    p = prob_in_top_k(clean, noisy, std, k=2)
    # Monte Carlo: resample only expert e's noise, others fixed at their sampled values.
    draws = 40_000
    for e in range(4):
        others = noisy.clone().repeat(draws, 1)
        others[:, e] = clean[0, e] + torch.randn(draws, generator=g) * std[0, e]
        in_top = (others.topk(2, 1).indices == e).any(1).float().mean()
        assert float(p[0, e]) == pytest.approx(float(in_top), abs=0.01)


def test_load_loss_has_gradient_for_noise_and_gate() -> None:
    clean = torch.randn(6, 4, requires_grad=True)
    std = torch.rand(6, 4).add(0.1).requires_grad_()
    noisy = (clean + torch.randn(6, 4) * std).detach()
    load_loss(clean, noisy, std, 2).backward()
    assert clean.grad.abs().sum() > 0 and std.grad.abs().sum() > 0


def test_fresh_conversion_reproduces_base_and_experts_start_equal() -> None:
    torch.manual_seed(0)
    base = dynnet.create_model(BASE).eval()
    model = dynnet.convert(base, "sparse_moe").eval()
    x = _x()
    torch.testing.assert_close(model(x), base(x))
    block = model.net.layer2[0]
    assert isinstance(block, MoEResidual) and len(block.experts) == 3
    assert block.experts[0].downsample is None  # the shared shortcut is not copied
    with dynnet.trace() as t:
        model(x)
    d = t.decisions["layer2.0"]
    assert (d.hard[:, -1] == 0).all() and (d.hard.sum(1) == 2).all()  # zero experts closed, two real experts


def _mix_zero_experts(model: dynnet.DynamicModel, x: torch.Tensor) -> None:
    """Put each router's zero-expert logit at the median second-best real logit, so about half the samples run one
    real expert instead of two."""
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0]))
        for m in model.modules()
        if isinstance(m, MoEResidual)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for block, inp in inputs.items():
            clean, _ = block.router(inp, False)
            second = clean[:, : block.num_experts].topk(2, 1).values[:, 1]
            block.router.w_gate.bias[-1] += second.median() - clean[:, -1].median()


def test_sparse_dispatch_equals_masked_and_macs_are_exact() -> None:
    model = _model()
    scramble_gates(model, seed=1, scale=3.0)
    model.eval()
    x = _x()
    _mix_zero_experts(model, x)
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as counter:
        sparse_out = model(x)
    torch.testing.assert_close(sparse_out, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ts.macs(), tm.macs())
    assert counter.total == pytest.approx(float(ts.executed_macs().sum()), abs=0.5)
    # Expert MACs per sample = (real experts chosen) × body cost, and load stats add up to the chosen pairs.
    block = model.net.layer1[0]
    body = 2 * 16 * 16 * 9 * 1024
    entry = next(e for e in ts.entries if e.name == "layer1.0/experts")
    used = ts.decisions["layer1.0"].hard[:, :4].sum(1)
    torch.testing.assert_close(entry.executed, used.double() * body)
    assert float(ts.outputs["layer1.0/load"].sum()) == float(used.sum())
    assert block.num_experts == 4
    all_used = torch.stack([d.hard[:, :4].sum(1) for d in ts.decisions.values()])
    assert 1 < float(all_used.mean()) < 2  # the scrambled routers pick a zero expert for some samples


def test_capacity_factor_drops_overflow() -> None:
    model = _model(capacity_factor=0.5).eval()
    with torch.no_grad():
        for block in (m for m in model.modules() if isinstance(m, MoEResidual)):
            block.router.w_gate.bias.copy_(torch.tensor([5.0, 4.0, 0.0, 0.0, -6.0]))  # everyone wants experts 0, 1
    x = _x(8)
    cap = math.ceil(0.5 * 8 * 2 / 4)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    load = t.outputs["layer1.0/load"]
    assert (load <= cap).all() and float(load.sum()) == 2 * cap
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts:
        model(x)
    torch.testing.assert_close(ts.macs(), t.macs())


def test_training_adds_balancing_losses_with_gradients() -> None:
    model = _model().train()
    x, y = _x(6), torch.arange(6)
    with dynnet.trace() as t:
        logits = model(x)
    assert any(k.endswith("/balance") for k in t.losses)
    loss = model.compute_loss(logits, y, t)
    loss.total.backward()
    router = model.net.layer1[0].router
    assert router.w_noise.weight.grad is not None and router.w_gate.weight.grad.abs().sum() > 0


def test_zero_experts_can_fill_every_slot() -> None:
    clean = torch.tensor([[0.0, 1.0, -1.0, 2.0, 5.0], [0.0, 1.0, -1.0, 2.0, 1.5], [0.0, 1.0, -1.0, 2.0, -5.0]])
    _, index, _ = noisy_top_k_gating(with_zero_experts(clean, 4, 2), None, 2)
    real = (index < 4).sum(1)
    assert real.tolist() == [0, 1, 2]  # zero logit above both, between, below the top two real logits
    model = _model().eval()
    block = model.net.layer1[0]
    with torch.no_grad():
        for b in (m for m in model.modules() if isinstance(m, MoEResidual)):
            b.router.w_gate.bias[-1] = 30.0  # every slot goes to a zero expert
    x = _x(4)
    inp = torch.randn(4, 16, 32, 32).relu()
    before = inp.clone()
    for mode in ("masked", "sparse"):
        dynnet.set_mode(model, mode)
        with torch.no_grad(), dynnet.trace() as t:
            out = block(inp)
        torch.testing.assert_close(out, inp)  # identity shortcut + ReLU of a non-negative input
        assert next(e for e in t.entries if e.name.endswith("/experts")).macs.sum() == 0
    torch.testing.assert_close(inp, before, rtol=0, atol=0)  # the block's input is never edited in place
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    assert float(t.mac_fraction().max()) < 0.1  # the stem, the projections and the routers only


def test_budget_loss_reaches_the_zero_experts_of_a_fresh_model_and_the_knob_is_monotone() -> None:
    model = _model(budget=0.5).train()
    x = _x(6)
    with dynnet.trace() as t:
        model(x)
    t.budget_loss(0.5).backward()
    bias_grad = model.net.layer1[0].router.w_gate.bias.grad
    assert bias_grad[-1] < 0  # descent raises the zero experts' logit although they are in no top-k yet
    model.eval()
    scramble_gates(model, seed=1, scale=3.0)
    dynnet.sparse(model)
    knob = model.budget_knob()
    fractions = []
    for value in (-30.0, -2.0, 0.0, 2.0, 30.0):
        knob.set(value)
        with torch.no_grad(), dynnet.trace() as t:
            model(x)
        fractions.append(float(t.mac_fraction().mean()))
    assert fractions == sorted(fractions) and fractions[0] < 0.1 and fractions[-1] > 1.5
