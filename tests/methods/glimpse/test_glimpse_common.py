"""Glimpse helpers: exact patch reads, retina scales, Gaussian log-density, REINFORCE gradient."""

import math

import torch
import torch.nn.functional as F

from dynnet.macs import MacCounter
from dynnet.methods.glimpse._common import crop_glimpse, gaussian_log_prob, policy_gradient_losses, retina_glimpse


def test_crop_reads_pixels_exactly_at_integer_centres() -> None:
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    # Patch of 4 centred between pixels 3 and 4 (normalised 0) = rows/cols 2..5.
    patch = crop_glimpse(x, torch.zeros(2, 2), 4)
    torch.testing.assert_close(patch, x[:, :, 2:6, 2:6])
    # Shift right by two pixels (2 * 2/8 in normalised units) and up by one.
    patch = crop_glimpse(x, torch.tensor([[0.5, -0.25]] * 2), 4)
    torch.testing.assert_close(patch, x[:, :, 1:5, 4:8])


def test_crop_pads_with_zeros_and_costs_no_macs() -> None:
    x = torch.ones(1, 1, 8, 8)
    with MacCounter() as counter:
        patch = crop_glimpse(x, torch.tensor([[-1.0, -1.0]]), 4)
    assert counter.total == 0
    assert float(patch.sum()) == 4.0  # only the 2x2 corner overlaps the image


def test_retina_scales_are_average_pooled() -> None:
    x = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    r = retina_glimpse(x, torch.zeros(1, 2), 4, 3)
    assert r.shape == (1, 6, 4, 4)
    torch.testing.assert_close(r[:, 2:4], F.avg_pool2d(x[:, :, 4:12, 4:12], 2))
    torch.testing.assert_close(r[:, 4:6], F.avg_pool2d(x, 4))


def test_gaussian_log_prob_matches_torch_distributions() -> None:
    mean, sample = torch.randn(5, 2), torch.randn(5, 2)
    expected = torch.distributions.Normal(mean, 0.3).log_prob(sample).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(sample, mean, 0.3), expected)
    assert math.isfinite(float(gaussian_log_prob(sample, mean, 1e-3).sum()))


def test_policy_gradient_losses_gradients() -> None:
    log_prob = torch.zeros(2, 3, requires_grad=True)
    baseline = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    reward = torch.tensor([1.0, 0.0])
    policy, value = policy_gradient_losses(log_prob, reward, baseline, mask)
    (policy + value).backward()
    # Policy term: -mean over the 3 taken steps of (R - b) log pi -> d/dlogpi = -(R - b) / 3.
    expected = -torch.tensor([[0.5, 1.0, 0.0], [0.0, 0.0, 0.0]]) / 3
    torch.testing.assert_close(log_prob.grad, expected)
    # Value term: mean over taken steps of (R - b)^2 -> d/db = -2 (R - b) / 3.
    torch.testing.assert_close(baseline.grad, -2 * torch.tensor([[0.5, 1.0, 0.0], [0.0, 0.0, 0.0]]) / 3)
