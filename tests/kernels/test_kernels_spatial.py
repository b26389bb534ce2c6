"""Pixel-wise sparse convolution kernels: sparse == masked (dense reference) over random masks and shapes."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from dynnet.kernels.spatial import (
    channels_last_rows,
    conv_out_size,
    gather_conv2d,
    gather_conv_image,
    gather_conv_rows,
    masked_conv2d_reference,
    matmul_rows,
    receptive_mask,
    rows_lookup,
    scatter_add_rows,
    sparse_conv2d,
    weight_matrix,
)
from dynnet.macs import MacCounter
from dynnet.testing.engines import ENGINES, kernel_engine
from dynnet.testing.masks import make_mask

MANY = settings(max_examples=1000, deadline=None, derandomize=True)


pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize("engine", ENGINES)
@MANY
@given(case=conv_cases(), channels_last=st.booleans())
def test_gather_conv2d_equals_dense_reference(engine, case, channels_last) -> None:
    n, c_in, c_out, k, stride, padding, dilation, h, w, kind, density, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, k, k, generator=g)
    ho, wo = conv_out_size(h, k, stride, padding, dilation), conv_out_size(w, k, stride, padding, dilation)
    mask = make_mask(kind, density, (n, ho, wo), g)
    with kernel_engine(engine):
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
    mask = make_mask(kind, density, (n, ho, wo), g)
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


@pytest.mark.parametrize("channels_last", [False, True])
def test_scatter_add_rows_matches_masked_add(channels_last: bool) -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 3, 4, 5, generator=g)
    if channels_last:
        base = base.contiguous(memory_format=torch.channels_last)
    kept = base.clone()
    mask = torch.rand(2, 4, 5, generator=g) < 0.5
    values = torch.randn(int(mask.sum()), 3, generator=g)
    out = scatter_add_rows(base, values, mask.nonzero())
    dense = torch.zeros(2, 4, 5, 3)
    dense[mask] = values
    torch.testing.assert_close(out, base + dense.permute(0, 3, 1, 2))
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(base, kept, rtol=0, atol=0)  # the input is not modified


def test_gather_conv2d_rejects_wrong_mask_shape() -> None:
    with pytest.raises(ValueError, match="mask must be"):
        gather_conv2d(
            torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.ones(1, 4, 4, dtype=torch.bool), padding=1
        )


@st.composite
def rows_cases(draw):
    """Compact rows with holes: a lookup in which some positions read as zero (-1)."""
    n = draw(st.integers(1, 3))
    c_in, c_out = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    k = draw(st.sampled_from([1, 3]))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, k // 2))
    h, w = draw(st.integers(max(1, k - 2 * padding), 10)), draw(st.integers(max(1, k - 2 * padding), 10))
    kind = draw(st.sampled_from(["random", "empty", "full"]))
    present = draw(st.floats(0.0, 1.0))
    density = draw(st.floats(0.0, 1.0))
    chunk = draw(st.sampled_from([1, 37, 1 << 19]))  # 1: a chunk of 64 rows; 1 << 19: one chunk
    seed = draw(st.integers(0, 2**31 - 1))
    return n, c_in, c_out, k, stride, padding, h, w, kind, present, density, chunk, seed


@pytest.mark.parametrize("engine", ENGINES)
@MANY
@given(case=rows_cases())
def test_gather_conv_rows_with_holes_equals_masked_input(engine, case) -> None:
    """Rows absent from the lookup read as zero, with and without a zero row, in one chunk or many."""
    import dynnet.kernels.spatial as spatial

    n, c_in, c_out, k, stride, padding, h, w, kind, present, density, chunk, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g)
    weight = torch.randn(c_out, c_in, k, k, generator=g)
    bias = torch.randn(c_out, generator=g)
    keep = torch.rand(n, h, w, generator=g) < present  # input positions that have a row
    ho, wo = conv_out_size(h, k, stride, padding, 1), conv_out_size(w, k, stride, padding, 1)
    mask = make_mask(kind, density, (n, ho, wo), g)
    kept = keep.nonzero()
    rows = x.permute(0, 2, 3, 1)[keep]  # Tensor[R, C], in kept order
    with_zero = torch.cat([rows, rows.new_zeros((1, c_in))])
    holes = rows_lookup(kept, (n, h, w))
    ref = F.conv2d(x * keep.unsqueeze(1), weight, bias, stride, padding).permute(0, 2, 3, 1)[mask]
    saved = spatial.GATHER_CHUNK_ELEMENTS
    spatial.GATHER_CHUNK_ELEMENTS = chunk
    try:
        with kernel_engine(engine):
            wmat = weight_matrix(weight)
            geometry = {"kernel": k, "stride": stride, "padding": padding, "bias": bias}
            plain = gather_conv_rows(rows, holes, wmat, mask.nonzero(), **geometry)
            zero = gather_conv_rows(with_zero, holes, wmat, mask.nonzero(), zero_row=rows.shape[0], **geometry)
            filled = rows_lookup(kept, (n, h, w), fill=rows.shape[0])
            zero_filled = gather_conv_rows(with_zero, filled, wmat, mask.nonzero(), zero_row=rows.shape[0], **geometry)
    finally:
        spatial.GATHER_CHUNK_ELEMENTS = saved
    for got in (plain, zero, zero_filled):
        assert got.shape == (int(mask.sum()), c_out)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [0, 1, 5, 300])
def test_matmul_rows_equals_addmm(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    cols, weight, bias = torch.randn(rows, 20, generator=g), torch.randn(7, 20, generator=g), torch.randn(7)
    wmat = weight.t()  # the layout weight_matrix returns
    with torch.no_grad():
        got = matmul_rows(cols, wmat, bias)
        with MacCounter() as counter:
            matmul_rows(cols, wmat)
    torch.testing.assert_close(got, torch.addmm(bias, cols, wmat), rtol=1e-5, atol=1e-5)
    assert counter.total == rows * 20 * 7
    # With autograd it is addmm, and gradients flow.
    cols.requires_grad_(True)
    matmul_rows(cols, wmat, bias).sum().backward()
    torch.testing.assert_close(cols.grad, wmat.sum(1).expand(rows, 20))


def test_gather_conv2d_weight_cache_follows_edits() -> None:
    g = torch.Generator().manual_seed(3)
    x, mask = torch.randn(1, 4, 6, 6, generator=g), torch.rand(1, 6, 6, generator=g) < 0.5
    conv = torch.nn.Conv2d(4, 5, 3, padding=1, bias=False)
    with torch.no_grad():
        gather_conv2d(x, conv.weight, mask, padding=1)  # fills the cache
        conv.weight.mul_(-2.0)  # in place: a new version
        torch.testing.assert_close(
            gather_conv2d(x, conv.weight, mask, padding=1), masked_conv2d_reference(x, conv.weight, mask, padding=1)
        )
        conv.weight.data = torch.randn(5, 4, 3, 3, generator=g)  # a new storage
        torch.testing.assert_close(
            gather_conv2d(x, conv.weight, mask, padding=1), masked_conv2d_reference(x, conv.weight, mask, padding=1)
        )
        for _ in range(3):  # fresh tensors, possibly at a recycled address, never hit a stale entry
            weight = torch.randn(5, 4, 3, 3, generator=g)
            ref = masked_conv2d_reference(x, weight, mask, padding=1)
            torch.testing.assert_close(gather_conv2d(x, weight, mask, padding=1), ref)
            del weight


def test_channels_last_rows_and_scatter_keep_inputs() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 5, generator=g)
    rows, zero_row = channels_last_rows(x)
    assert zero_row == 40 and rows.shape == (41, 3) and not rows[40].any()
    torch.testing.assert_close(rows[:40], x.permute(0, 2, 3, 1).reshape(40, 3))
    base = x.contiguous(memory_format=torch.channels_last)
    before = base.clone()
    mask = torch.rand(2, 4, 5, generator=g) < 0.5
    scatter_add_rows(base, torch.ones(int(mask.sum()), 3), mask.nonzero())
    torch.testing.assert_close(base, before)  # a channels-last base is not modified in place


def test_matmul_rows_packed_weight_follows_edits() -> None:
    g = torch.Generator().manual_seed(6)
    cols, weight = torch.randn(9, 12, generator=g), torch.randn(5, 12, generator=g)
    wmat = weight.t()
    with torch.no_grad():
        for _ in range(3):  # the second call packs the weight, the third reuses it
            torch.testing.assert_close(matmul_rows(cols, wmat), cols @ wmat, rtol=1e-5, atol=1e-5)
        weight.mul_(-3.0)  # shares wmat's version counter
        torch.testing.assert_close(matmul_rows(cols, wmat), cols @ wmat, rtol=1e-5, atol=1e-5)
        with MacCounter() as counter:
            matmul_rows(cols, wmat)
    assert counter.total == 9 * 12 * 5


@pytest.mark.parametrize("chunk", [1, 1 << 14])
def test_parallel_chunks_equal_the_serial_gather_gemm(chunk: int, monkeypatch) -> None:
    """On 2 threads with several chunks, each thread gathers and multiplies whole chunks
    (``torch.ops.dynnet.gather_gemm``): the same rows as one thread (image and row inputs, plain and prepacked
    weights, bias), the MAC counter's count, and the op really ran."""
    import dynnet.kernels.spatial as spatial

    g = torch.Generator().manual_seed(chunk)
    x = torch.randn(3, 16, 13, 11, generator=g)
    weight, bias = torch.randn(24, 16, 3, 3, generator=g), torch.randn(24, generator=g)
    mask = torch.rand(3, 13, 11, generator=g) < 0.6
    keep = torch.rand(3, 13, 11, generator=g) < 0.8
    kept = keep.nonzero()
    rows = x.permute(0, 2, 3, 1)[keep].contiguous()
    lookup = rows_lookup(kept, (3, 13, 11))
    ref_image = masked_conv2d_reference(x, weight, mask, padding=1)
    ref_rows = F.conv2d(x * keep.unsqueeze(1), weight, bias, 1, 1).permute(0, 2, 3, 1)[mask]
    monkeypatch.setattr(spatial, "GATHER_CHUNK_ELEMENTS", chunk)  # chunks of 64 or 113 rows (K = 144)
    threads = torch.get_num_threads()
    calls: list[int] = []
    real = spatial._gather_gemm_op

    def counted():
        calls.append(1)
        return real()

    monkeypatch.setattr(spatial, "_gather_gemm_op", counted)
    try:
        torch.set_num_threads(2)
        with kernel_engine("native"), torch.no_grad():
            wmat = weight_matrix(weight)
            for _ in range(2):  # the second call multiplies by oneDNN's prepacked copy of the matrix
                got_image = gather_conv_image(x, wmat, mask.nonzero(), kernel=3, padding=1)
                got_rows = gather_conv_rows(rows, lookup, wmat, mask.nonzero(), kernel=3, padding=1, bias=bias)
                torch.testing.assert_close(got_image, ref_image, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(got_rows, ref_rows, rtol=1e-4, atol=1e-4)
            with MacCounter() as counter:
                gather_conv_rows(rows, lookup, wmat, mask.nonzero(), kernel=3, padding=1)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 5  # every call above ran the parallel op
    assert counter.total == int(mask.sum()) * weight.numel()
