"""ACT halting and ponder cost (Graves 2016) against hand-computed values and autograd."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynnet.estimators.ponder import act_weights, halts, ponder_cost, straight_through_select


def test_act_weights_hand_example() -> None:
    h = torch.tensor([[0.3, 0.5, 0.9, 0.0], [0.995, 0.1, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    act = act_weights(h, eps=0.01)
    assert act.steps.tolist() == [3, 1, 4]
    torch.testing.assert_close(act.remainder, torch.tensor([0.2, 1.0, 0.7], dtype=torch.float64))
    expected = torch.tensor([[0.3, 0.5, 0.2, 0.0], [1.0, 0, 0, 0], [0.1, 0.1, 0.1, 0.7]], dtype=torch.float64)
    torch.testing.assert_close(act.weights, expected)
    torch.testing.assert_close(act.ran, torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64))
    torch.testing.assert_close(
        ponder_cost(act.steps, act.remainder), torch.tensor([3.2, 2.0, 4.7], dtype=torch.float64)
    )


def test_ponder_cost_gradient_is_minus_one_before_halting() -> None:
    h = torch.tensor([[0.3, 0.5, 0.9, 0.4]], dtype=torch.float64, requires_grad=True)
    act = act_weights(h)
    ponder_cost(act.steps, act.remainder).sum().backward()
    torch.testing.assert_close(h.grad, torch.tensor([[-1.0, -1.0, 0.0, 0.0]], dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4), min_size=1, max_size=6))
def test_incremental_rule_matches_act_weights(rows: list[list[float]]) -> None:
    h = torch.tensor(rows, dtype=torch.float64)
    act = act_weights(h)
    assert torch.allclose(act.weights.sum(1), torch.ones(len(rows), dtype=torch.float64))
    for i, row in enumerate(h):
        cumulative, step = torch.zeros(1, dtype=torch.float64), 4
        for k in range(3):
            if bool(halts(cumulative, row[k : k + 1])):
                step = k + 1
                break
            cumulative = cumulative + row[k]
        assert act.steps[i].item() == step


def test_straight_through_select_is_hard_forward_and_mean_field_backward() -> None:
    h = torch.tensor([[0.3, 0.5, 0.9, 0.0]], dtype=torch.float64, requires_grad=True)
    states = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=torch.float64)
    act = act_weights(h)
    sel = straight_through_select(act.weights, act.steps)
    out = (sel * states).sum()
    assert out.item() == 4.0  # exactly the halting unit's state
    out.backward()
    # mean-field output sum_n p_n x_n: d/dh_n = x_n - x_N for n < N
    torch.testing.assert_close(h.grad, torch.tensor([[1.0 - 4.0, 2.0 - 4.0, 0.0, 0.0]], dtype=torch.float64))
