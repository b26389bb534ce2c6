"""Budget losses used with the estimators: per-gate target rate and global MAC budget (values and gradients)."""

import pytest
import torch

from dynnet.core import Decision
from dynnet.losses import mac_budget_loss, target_rate_loss


def test_target_rate_loss_value_and_gradient() -> None:
    soft = torch.tensor([0.9, 0.8, 0.2, 0.6], requires_grad=True)
    hard = (soft > 0.5).float() + soft - soft.detach()  # straight-through: forward [1, 1, 0, 1]
    other = torch.tensor([0.0, 0.0, 1.0, 0.0])
    loss = target_rate_loss([Decision(hard, soft, "layer"), Decision(other, None, "layer")], target=0.5)
    assert loss.item() == pytest.approx((0.75 - 0.5) ** 2 + (0.25 - 0.5) ** 2)
    loss.backward()
    torch.testing.assert_close(soft.grad, torch.full((4,), 2 * (0.75 - 0.5) / 4))
    with pytest.raises(ValueError):
        target_rate_loss([], 0.5)


def test_mac_budget_loss_value_and_gradient() -> None:
    macs = torch.tensor([40.0, 80.0], dtype=torch.float64, requires_grad=True)
    loss = mac_budget_loss(macs, dense=100.0, target=0.5)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((0.6 - 0.5) ** 2)
    loss.backward()
    torch.testing.assert_close(macs.grad, torch.full((2,), 2 * 0.1 / 100 / 2, dtype=torch.float64))
