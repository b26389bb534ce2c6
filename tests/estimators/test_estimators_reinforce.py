"""REINFORCE: log-probabilities, entropy, baselines, and unbiasedness on a toy bandit."""

import pytest
import torch

from dynnet.estimators.reinforce import (
    bernoulli_entropy,
    bernoulli_log_prob,
    moving_average,
    reinforce_loss,
    sample_bernoulli,
    self_critical_advantage,
)


def test_log_prob_and_entropy_match_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(7, 3, generator=g) * 0.9 + 0.05
    action = torch.bernoulli(prob, generator=g)
    dist = torch.distributions.Bernoulli(probs=prob)
    torch.testing.assert_close(bernoulli_log_prob(prob, action), dist.log_prob(action).sum(1))
    torch.testing.assert_close(bernoulli_entropy(prob), dist.entropy().sum(1))


def _bandit_gradient(theta: torch.Tensor, payoff: torch.Tensor, baseline: float, n: int, seed: int) -> torch.Tensor:
    theta = theta.clone().requires_grad_(True)
    prob = torch.sigmoid(theta).expand(n, -1)
    action = sample_bernoulli(prob, generator=torch.Generator().manual_seed(seed))
    reward = (action * payoff).sum(1)
    # minimising the surrogate follows -grad E[r]; its gradient is the negated estimate
    reinforce_loss(bernoulli_log_prob(prob, action), reward, baseline).backward()
    return -theta.grad


@pytest.mark.parametrize("baseline", [0.0, 1.5])
def test_reinforce_is_unbiased_on_a_bandit(baseline: float) -> None:
    """E[r] = sum_k c_k p_k, so d E[r] / d theta_k = c_k p_k (1 - p_k) — with or without a baseline."""
    theta = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    payoff = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    p = torch.sigmoid(theta)
    exact = payoff * p * (1 - p)
    estimate = _bandit_gradient(theta, payoff, baseline, n=200_000, seed=1)
    torch.testing.assert_close(estimate, exact, atol=0.01, rtol=0)


def test_baseline_reduces_variance() -> None:
    theta = torch.zeros(2, dtype=torch.float64)
    payoff = torch.tensor([3.0, 3.0], dtype=torch.float64)  # mean reward 3: the right baseline
    no_base = torch.stack([_bandit_gradient(theta, payoff, 0.0, 64, s) for s in range(40)])
    base = torch.stack([_bandit_gradient(theta, payoff, 3.0, 64, s) for s in range(40)])
    assert (base.var(0) < 0.5 * no_base.var(0)).all()


def test_entropy_bonus_pushes_towards_uniform() -> None:
    logit = torch.tensor([2.0], requires_grad=True)
    prob = torch.sigmoid(logit).expand(4, 1)
    action = torch.ones(4, 1)
    loss = reinforce_loss(
        bernoulli_log_prob(prob, action), torch.zeros(4), entropy=bernoulli_entropy(prob), entropy_weight=1.0
    )
    loss.backward()
    assert logit.grad.item() > 0  # descending lowers the logit, towards p = 0.5


def test_moving_average_and_self_critical() -> None:
    b = moving_average(torch.tensor(1.0), torch.tensor([3.0, 5.0]), momentum=0.75)
    assert b.item() == pytest.approx(0.75 * 1.0 + 0.25 * 4.0)
    r = torch.tensor([1.0, -5.0, 0.5])
    torch.testing.assert_close(self_critical_advantage(r, r), torch.zeros(3))
    torch.testing.assert_close(
        self_critical_advantage(r, torch.tensor([0.0, 0.0, 1.0])), torch.tensor([1.0, -5.0, -0.5])
    )
    with pytest.raises(ValueError, match="momentum"):
        moving_average(torch.tensor(0.0), r, momentum=1.0)


def test_reinforce_loss_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"Tensor\[N\]"):
        reinforce_loss(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="same shape"):
        bernoulli_log_prob(torch.rand(3, 2), torch.ones(3))
