"""Gumbel-Softmax / Gumbel-Sigmoid and straight-through estimators: forward values and gradients."""

import pytest
import torch

from dynnet.estimators import gumbel_sigmoid, gumbel_softmax, straight_through, straight_through_sigmoid


def test_gumbel_softmax_hard_is_one_hot_with_soft_gradient() -> None:
    logits = torch.randn(32, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    sample, probs = gumbel_softmax(logits, tau=0.5, generator=torch.Generator().manual_seed(1))
    assert set(sample.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(sample.sum(1), torch.ones(32))
    torch.testing.assert_close(probs, torch.softmax(logits, 1))
    soft, _ = gumbel_softmax(logits, tau=0.5, hard=False, generator=torch.Generator().manual_seed(1))
    w = torch.randn(32, 5, generator=torch.Generator().manual_seed(2))
    (g_hard,) = torch.autograd.grad((sample * w).sum(), logits)
    (g_soft,) = torch.autograd.grad((soft * w).sum(), logits)
    torch.testing.assert_close(g_hard, g_soft)


def test_gumbel_softmax_without_noise_is_argmax_and_sampling_follows_probs() -> None:
    logits = torch.tensor([[0.0, 1.0, -1.0]])
    sample, _ = gumbel_softmax(logits, noise=False)
    assert sample.argmax(1).item() == 1
    many = logits.expand(20_000, 3)
    s, probs = gumbel_softmax(many, tau=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(s.mean(0), probs[0], atol=0.015, rtol=0)


def test_gumbel_sigmoid_hard_binary_frequency_and_threshold() -> None:
    logits = torch.full((20_000,), 0.7)
    hard, _ = gumbel_sigmoid(logits, generator=torch.Generator().manual_seed(0))
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert hard.mean().item() == pytest.approx(torch.sigmoid(torch.tensor(0.7)).item(), abs=0.015)
    det, _ = gumbel_sigmoid(torch.tensor([-0.1, 0.1]), noise=False)
    assert det.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="tau"):
        gumbel_sigmoid(logits, tau=0.0)


def test_straight_through_forward_exact_gradient_of_soft() -> None:
    soft = torch.tensor([0.2, 0.7, 0.49], requires_grad=True)
    out = straight_through((soft > 0.5).float(), soft)
    assert out.tolist() == [0.0, 1.0, 0.0]
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert soft.grad.tolist() == [1.0, 2.0, 3.0]


def test_straight_through_sigmoid_gradient_is_the_sigmoids() -> None:
    logits = torch.tensor([-1.0, 0.5, 3.0], requires_grad=True)
    hard, _ = straight_through_sigmoid(logits)
    assert hard.tolist() == [0.0, 1.0, 1.0]
    hard.sum().backward()
    p = torch.sigmoid(logits.detach())
    torch.testing.assert_close(logits.grad, p * (1 - p))
    stochastic, _ = straight_through_sigmoid(
        torch.zeros(20_000), stochastic=True, generator=torch.Generator().manual_seed(0)
    )
    assert stochastic.mean().item() == pytest.approx(0.5, abs=0.015)
