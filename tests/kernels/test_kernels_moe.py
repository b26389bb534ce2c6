"""MoE dispatch: sparse dispatch equals the dense weighted sum, each expert sees only its samples, capacity."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynnet.kernels.moe import capacity_keep, dense_combine, dispatch_add, expert_capacity, expert_counts


class _Recorder:
    """An expert ``x -> x @ w`` that remembers how many rows it saw."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w, self.rows = w, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return x @ self.w


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), e=st.integers(2, 5), k=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_dispatch_equals_dense_weighted_sum(n: int, e: int, k: int, seed: int) -> None:
    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    experts = [_Recorder(torch.randn(4, 3, generator=g, dtype=torch.float64)) for _ in range(e)]
    index = torch.stack([torch.randperm(e + 1, generator=g)[:k] for _ in range(n)]) - 1  # -1: no expert
    weight = torch.rand(n, k, generator=g, dtype=torch.float64)
    base = torch.randn(n, 3, generator=g, dtype=torch.float64)
    gates = torch.zeros(n, e + 1, dtype=torch.float64).scatter(1, index + 1, weight)[:, 1:]
    sparse = dispatch_add(experts, x, index, weight, base)
    torch.testing.assert_close(sparse, dense_combine(experts, x, gates, base))
    counts = expert_counts(index, e)
    for i, ex in enumerate(experts):
        # one sparse call on exactly the routed rows (or none), then one dense call on all n
        assert ex.rows[:-1] == ([int(counts[i])] if counts[i] > 0 else [])
        assert ex.rows[-1] == n


def test_dispatch_without_routed_samples_returns_base() -> None:
    base = torch.randn(3, 2)
    out = dispatch_add([lambda x: 1 / 0], torch.randn(3, 2), torch.full((3, 1), -1), torch.ones(3, 1), base)
    assert out is base


def test_expert_capacity_formula() -> None:
    assert expert_capacity(6, 4, 2, 1.25) == 4  # ceil(3.75)
    assert expert_capacity(8, 4, 1, 1.0) == 2


def test_capacity_keep_serves_first_choices_first() -> None:
    # Every sample picks expert 0 first and expert 1 second; capacity 2.
    index = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 2]])
    keep = capacity_keep(index, num_experts=3, capacity=2)
    # Expert 0: samples 0, 1 (first choices). Expert 1: sample 3's first choice, then sample 0's second choice.
    expected = torch.tensor([[True, True], [True, False], [False, False], [True, True]])
    assert torch.equal(keep, expected)


def test_capacity_keep_ignores_unrouted_entries() -> None:
    index = torch.tensor([[0, -1], [0, 4], [0, -1]])
    keep = capacity_keep(index, num_experts=2, capacity=1)
    assert torch.equal(keep, torch.tensor([[True, True], [False, True], [False, True]]))
