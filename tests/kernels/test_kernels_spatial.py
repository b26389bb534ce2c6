"""Pixel-wise sparse convolution kernels: sparse == masked (dense reference) over random masks and shapes."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from dynnet.kernels.spatial import (
    conv_out_size,
    gather_conv2d,
    masked_conv2d_reference,
    receptive_mask,
    scatter_add_rows,
    sparse_conv2d,
)
from dynnet.macs import MacCounter

MANY = settings(max_examples=1000, deadline=None, derandomize=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny kernels: one thread avoids the thread-pool overhead that dominates on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@st.composite
def conv_cases(draw):
    n = draw(st.integers(1, 3))
    c_in, c_out = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    k = draw(st.sampled_from([1, 3, 5]))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    padding = draw(st.integers(0, k // 2 * dilation))
    span = dilation * (k - 1) + 1
    h = draw(st.integers(max(1, span - 2 * padding), 12))
    w = draw(st.integers(max(1, span - 2 * padding), 12))
    kind = draw(st.sampled_from(["random", "empty", "full"]))
    density = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, c_in, c_out, k, stride, padding, dilation, h, w, kind, density, seed


def _mask(kind: str, density: float, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if kind == "empty":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "full":
        return torch.ones(shape, dtype=torch.bool)
    return torch.rand(shape, generator=g) < density


@MANY
@given(conv_cases())
def test_gather_conv2d_equals_dense_reference(case) -> None:
    n, c_in, c_out, k, stride, padding, dilation, h, w, kind, density, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g)
    weight = torch.randn(c_out, c_in, k, k, generator=g)
    ho, wo = conv_out_size(h, k, stride, padding, dilation), conv_out_size(w, k, stride, padding, dilation)
    mask = _mask(kind, density, (n, ho, wo), g)
    rows = gather_conv2d(x, weight, mask, stride=stride, padding=padding, dilation=dilation)
    ref = masked_conv2d_reference(x, weight, mask, stride=stride, padding=padding, dilation=dilation)
    assert rows.shape == (int(mask.sum()), c_out)
    torch.testing.assert_close(rows, ref, rtol=1e-4, atol=1e-4)


@MANY
@given(conv_cases())
def test_receptive_mask_is_the_set_of_inputs_read(case) -> None:
    n, _, _, k, stride, padding, dilation, h, w, kind, density, seed = case
    g = torch.Generator().manual_seed(seed)
    ho, wo = conv_out_size(h, k, stride, padding, dilation), conv_out_size(w, k, stride, padding, dilation)
    mask = _mask(kind, density, (n, ho, wo), g)
    got = receptive_mask(mask, k, stride, padding, dilation, (h, w))
    # Oracle: an input position is read iff the gradient of the masked output sum reaches it.
    x = torch.ones(n, 1, h, w, requires_grad=True)
    y = F.conv2d(x, torch.ones(1, 1, k, k), None, stride, padding, dilation)
    (y[:, 0] * mask).sum().backward()
    assert torch.equal(got, x.grad[:, 0] > 0)
    soft = receptive_mask(mask.float(), k, stride, padding, dilation, (h, w))
    assert torch.equal(soft > 0.5, got)


def test_receptive_mask_float_carries_gradient() -> None:
    m = torch.rand(2, 6, 6, requires_grad=True)
    out = receptive_mask(m, 3, 1, 1, 1, (6, 6))
    torch.testing.assert_close(out, F.max_pool2d(m.unsqueeze(1), 3, 1, 1).squeeze(1))
    out.sum().backward()
    assert m.grad is not None and m.grad.sum() > 0
    m2 = torch.rand(1, 3, 3, requires_grad=True)
    receptive_mask(m2, 3, 2, 1, 1, (6, 6)).sum().backward()  # strided path
    assert m2.grad is not None and (m2.grad > 0).any()


def test_gather_conv2d_macs_are_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 5, 9, 9, generator=g), torch.randn(7, 5, 3, 3, generator=g)
    mask = torch.rand(2, 9, 9, generator=g) < 0.3
    with MacCounter() as counter:
        gather_conv2d(x, weight, mask, padding=1)
    assert counter.total == int(mask.sum()) * 7 * 5 * 9
    result = sparse_conv2d(x, weight, mask, padding=1)
    torch.testing.assert_close(result.executed, mask.flatten(1).sum(1).double() * weight.numel())
    assert not result.dense


def test_sparse_conv2d_dense_fallback_above_crossover() -> None:
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(1, 3, 8, 8, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    mask = torch.rand(1, 8, 8, generator=g) < 0.5
    fast = sparse_conv2d(x, weight, mask, padding=1, crossover=1.0)
    dense = sparse_conv2d(x, weight, mask, padding=1, crossover=0.0)
    assert dense.dense and not fast.dense
    torch.testing.assert_close(fast.rows, dense.rows, rtol=1e-5, atol=1e-5)
    assert dense.executed.item() == 64 * weight.numel()


def test_scatter_add_rows_matches_masked_add() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 3, 4, 5, generator=g)
    mask = torch.rand(2, 4, 5, generator=g) < 0.5
    values = torch.randn(int(mask.sum()), 3, generator=g)
    out = scatter_add_rows(base, values, mask.nonzero())
    dense = torch.zeros(2, 4, 5, 3)
    dense[mask] = values
    torch.testing.assert_close(out, base + dense.permute(0, 3, 1, 2))


def test_gather_conv2d_rejects_wrong_mask_shape() -> None:
    with pytest.raises(ValueError, match="mask must be"):
        gather_conv2d(
            torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.ones(1, 4, 4, dtype=torch.bool), padding=1
        )
