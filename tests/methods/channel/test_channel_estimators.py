"""Estimators and losses of the channel family: analytic oracles and gradient checks."""

from __future__ import annotations

import pytest
import torch

from dynnet.estimators.q_learning import epsilon_greedy, q_learning_loss, td_targets
from dynnet.estimators.semhash import improved_semhash, saturating_sigmoid
from dynnet.estimators.stochastic_neurons import noisy_rectifier, st_binary, stochastic_times_smooth, unbiased_binary
from dynnet.losses.batch_shaping import batch_shaping_loss, beta_cdf
from dynnet.losses.instance_sparsity import channel_norms, feature_l21, instance_keep_mask


def test_beta_cdf_closed_forms() -> None:
    x = torch.tensor([0.01, 0.2, 0.5, 0.7, 0.99], dtype=torch.float64)
    torch.testing.assert_close(beta_cdf(x, 1.0, 1.0), x)
    torch.testing.assert_close(beta_cdf(x, 0.6, 1.0), x**0.6)
    torch.testing.assert_close(beta_cdf(x, 1.0, 0.4), 1 - (1 - x) ** 0.4)
    torch.testing.assert_close(
        beta_cdf(torch.tensor([0.5], dtype=torch.float64), 0.3, 0.3), torch.tensor([0.5]).double()
    )


def test_beta_cdf_gradient_is_the_density() -> None:
    x = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: beta_cdf(v, 0.6, 0.4), (x,))


def test_batch_shaping_loss_is_zero_at_the_prior_quantiles() -> None:
    n = 9
    quantiles = torch.arange(1, n + 1, dtype=torch.float64)[:, None] / (n + 1)  # uniform = Beta(1, 1)
    gates = quantiles[torch.randperm(n)].repeat(1, 3)
    assert batch_shaping_loss(gates, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-12)
    # All gates at 1/2 for a U-shaped prior: a positive loss whose gradient spreads the values apart.
    flat = torch.full((6, 1), 0.5, dtype=torch.float64, requires_grad=True)
    loss = batch_shaping_loss(flat + torch.linspace(-1e-3, 1e-3, 6, dtype=torch.float64)[:, None], 0.6, 0.4)
    loss.backward()
    assert loss.item() > 0
    assert flat.grad is not None and torch.isfinite(flat.grad).all()
    with pytest.raises(ValueError, match="N >= 2"):
        batch_shaping_loss(torch.rand(1, 4))


def test_straight_through_binary_units() -> None:
    a = torch.tensor([[-3.0, 0.5, 4.0]], requires_grad=True)
    hard, value, p = st_binary(a, sample=False)
    assert hard.tolist() == [[0.0, 1.0, 1.0]] and value is hard
    hard.sum().backward()
    torch.testing.assert_close(a.grad, (p * (1 - p)).detach())  # gradient of the sigmoid
    a.grad = None
    st_binary(a, sample=False, identity=True)[0].sum().backward()
    torch.testing.assert_close(a.grad, torch.ones_like(a))


def test_stochastic_times_smooth_is_unbiased_and_zero_when_off() -> None:
    a = torch.full((20000,), 0.3)
    hard, value, _p = stochastic_times_smooth(a, generator=torch.Generator().manual_seed(0))
    assert torch.equal(value == 0, hard == 0)
    assert value.mean().item() == pytest.approx(torch.sigmoid(torch.tensor(0.3)).item(), abs=0.01)  # E[h] = p


def test_noisy_rectifier_and_unbiased_units() -> None:
    a = torch.tensor([-1.0, 0.0, 2.0])
    hard, value, _ = noisy_rectifier(a, sample=False)
    assert value.tolist() == [0.0, 0.0, 2.0] and hard.tolist() == [0.0, 0.0, 1.0]
    b, v, _p = unbiased_binary(torch.tensor([-9.0, 9.0]), sample=False)
    assert b.tolist() == [0.0, 1.0] and v is b and not b.requires_grad


def test_improved_semhash() -> None:
    a = torch.tensor([-2.0, -0.1, 0.1, 3.0], requires_grad=True)
    value, _prob = improved_semhash(a, sample=False)
    assert value.tolist() == [0.0, 0.0, 1.0, 1.0]
    value, _ = improved_semhash(a, generator=torch.Generator().manual_seed(0))
    assert ((value >= 0) & (value <= 1)).all()
    value.sum().backward()
    assert a.grad is not None and (a.grad >= 0).all()
    assert saturating_sigmoid(torch.tensor([-100.0, 0.0, 100.0])).tolist() == [0.0, pytest.approx(0.5), 1.0]


def test_q_learning_targets_and_loss() -> None:
    q0 = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    q1 = torch.tensor([[3.0, 5.0], [4.0, 1.0]], requires_grad=True)
    rewards = [torch.tensor([-0.1, -0.2]), torch.tensor([-1.0, 0.0])]
    y0, y1 = td_targets([q0, q1], rewards, gamma=0.5)
    torch.testing.assert_close(y0, torch.tensor([-0.1 + 2.5, -0.2 + 2.0]))
    torch.testing.assert_close(y1, rewards[1])
    actions = [torch.tensor([1, 0]), torch.tensor([0, 0])]
    loss = q_learning_loss([q0, q1], actions, rewards, gamma=0.5)
    expected = (((2.0 - 2.4) ** 2 + (0.0 - 1.8) ** 2) / 2 + ((3.0 + 1.0) ** 2 + 4.0**2) / 2) / 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert q1.grad[0, 1] == 0  # the bootstrap max is detached
    assert epsilon_greedy(q0, 0.0).tolist() == [1, 0]
    assert epsilon_greedy(q0, 1.0, generator=torch.Generator().manual_seed(0)).shape == (2,)


def test_instance_sparsity_pieces() -> None:
    h = torch.zeros(2, 3, 2, 2)
    h[0, 0] = 1.0
    h[0, 1] = 0.1
    h[1, 2] = 2.0
    norms = channel_norms(h)
    torch.testing.assert_close(norms, torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.0, 2.0]]))
    assert feature_l21(h).item() == pytest.approx((1.1 + 2.0) / 2)
    assert instance_keep_mask(norms, 0.0).tolist() == [[True, True, False], [False, False, True]]
    assert instance_keep_mask(norms, 1.0).tolist() == [[True, False, False], [False, False, True]]
