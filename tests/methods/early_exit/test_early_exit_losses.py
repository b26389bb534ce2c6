"""Early-exit losses (dynnet.losses.early_exit): analytic values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynnet.losses.early_exit import (
    adaptive_exit_targets,
    exit_distillation_loss,
    exit_mixture,
    expected_exit_cost,
    multi_exit_cross_entropy,
    weighted_policy_loss,
)


def test_multi_exit_cross_entropy_is_the_weighted_sum() -> None:
    torch.manual_seed(0)
    z = [torch.randn(5, 4) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3, 0])
    expected = 0.5 * F.cross_entropy(z[0], y) + F.cross_entropy(z[1], y) + 2 * F.cross_entropy(z[2], y)
    torch.testing.assert_close(multi_exit_cross_entropy(z, y, [0.5, 1.0, 2.0]), expected)
    with pytest.raises(ValueError):
        multi_exit_cross_entropy(z, y, [1.0])


def test_distillation_is_zero_for_identical_logits_and_teacher_gets_no_gradient() -> None:
    z = torch.randn(4, 6)
    assert exit_distillation_loss(z, z, 2.0).abs().item() < 1e-6
    teacher = torch.randn(4, 6, requires_grad=True)
    student = torch.randn(4, 6, requires_grad=True)
    exit_distillation_loss(student, teacher, 3.0).backward()
    assert teacher.grad is None and student.grad is not None
    # T^2 KL(q || p) by hand
    p, q = F.log_softmax(student / 3, 1), F.softmax(teacher / 3, 1)
    manual = (q * (q.log() - p)).sum(1).mean() * 9
    torch.testing.assert_close(exit_distillation_loss(student, teacher, 3.0), manual)


def test_exit_mixture_analytic() -> None:
    h = [torch.tensor([0.5, 0.0, 1.0]), torch.tensor([0.5, 1.0, 0.3])]
    p = exit_mixture(h)
    expected = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(p, expected)
    torch.testing.assert_close(expected_exit_cost(p, torch.tensor([1.0, 2.0, 4.0])), torch.tensor([2.0, 2.0, 1.0]))


def test_adaptive_exit_targets_bottom_up() -> None:
    # Two samples, three exits, λ = 1, stop costs c = (0.2, 0.5, 1.0).
    errors = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    costs = torch.tensor([0.2, 0.5, 1.0])
    downstream = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    labels, weights = adaptive_exit_targets(errors, costs, downstream, 1.0)
    # sample 0: stop costs (0.2, 0.5, 1.0); V_2 = 1.0 → exit at 1 (0.5 < 1); policy 1 exits → V_1 = 0.5
    #           → exit at 0 (0.2 < 0.5)
    # sample 1: stop costs (1.2, 1.5, 1.0); V_2 = 1.0 → continue at 1 (1.5 > 1); policy 1 continues → V = 1.0
    #           → continue at 0 (1.2 > 1.0)
    torch.testing.assert_close(labels, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(weights, torch.tensor([[0.3, 0.5], [0.2, 0.5]]))


def test_weighted_policy_loss_ignores_zero_weights() -> None:
    logits = torch.tensor([[3.0, -1.0]], requires_grad=True)
    loss = weighted_policy_loss(logits, torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 2.0]]))
    torch.testing.assert_close(loss, 2 * F.softplus(torch.tensor(1.0)))
    loss.backward()
    assert logits.grad[0, 0] == 0
