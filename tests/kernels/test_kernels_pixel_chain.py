"""``torch.ops.dynnet.pixel_chain`` (a whole masked convolution chain in one compiled call) and the compiled tile
copies, against the dense masked reference."""

from __future__ import annotations

import re

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings

from dynnet.kernels import native, spatial
from dynnet.kernels.spatial import conv_out_size, pixel_chain, weight_matrix
from dynnet.macs import MacCounter
from dynnet.testing.engines import kernel_engine
from dynnet.testing.masks import make_mask

MANY = settings(max_examples=1000, deadline=None, derandomize=True)

pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def chain_cases(draw):
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    channels = [draw(st.integers(1, 8))]
    stages = []
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.sampled_from([1, 3]))
        dilation = draw(st.integers(1, 2)) if k == 3 else 1
        stages.append(
            (
                k,
                draw(st.integers(1, 2)),  # stride
                draw(st.integers(0, k // 2 * dilation)),  # padding
                dilation,
                draw(st.booleans()),  # relu
                draw(st.booleans()),  # bias
                draw(st.sampled_from(["random", "random", "empty", "full"])),
                draw(st.floats(0.0, 1.0)),
            )
        )
        channels.append(draw(st.integers(1, 8)))
    return n, h, w, channels, stages, draw(st.integers(0, 2**31 - 1))


def _build(case):
    """Operands of a random chain and its dense masked reference (each stage's output zero off its mask)."""
    n, h, w, channels, stages, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels[0], h, w, generator=g)
    masks, weights, biases, geometries, relus = [], [], [], [], []
    ref = x
    for i, (k, s, p, d, relu, with_bias, kind, density) in enumerate(stages):
        h, w = conv_out_size(h, k, s, p, d), conv_out_size(w, k, s, p, d)
        assume(h >= 1 and w >= 1)
        weight = torch.randn(channels[i + 1], channels[i], k, k, generator=g)
        bias = torch.randn(channels[i + 1], generator=g) if with_bias else None
        mask = make_mask(kind, density, (n, h, w), g)
        ref = F.conv2d(ref, weight, bias, s, p, d)
        ref = (ref.relu() if relu else ref) * mask.unsqueeze(1)
        masks.append(mask)
        weights.append(weight)
        biases.append(bias)
        geometries.append((k, s, p, d))
        relus.append(relu)
    return x, masks, weights, biases, geometries, relus, ref


@pytest.mark.parametrize("small_gemm", [True, False], ids=["own-small-gemm", "onednn"])
@MANY
@given(case=chain_cases(), channels_last=st.booleans())
def test_pixel_chain_equals_the_masked_chain(small_gemm: bool, case, channels_last: bool) -> None:
    """Any chain of 1–3 stages (kernels 1 and 3, strides, paddings, dilations, ReLU or none, bias or none), with
    random, empty and full masks that need not cover what the next stage reads (missing rows read zero): the rows at
    the last mask's positions, those positions, and the MACs executed per sample; multiplied by dynnet's small GEMM
    (these narrow stages) or by oneDNN's matmul."""
    x, masks, weights, biases, geometries, relus, ref = _build(case)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    saved = spatial.SMALL_GEMM_MAX_CHANNELS
    spatial.SMALL_GEMM_MAX_CHANNELS = saved if small_gemm else 0
    try:
        with kernel_engine("native"), torch.no_grad():
            got = pixel_chain(x, masks, [weight_matrix(w) for w in weights], biases, geometries, relus)
    finally:
        spatial.SMALL_GEMM_MAX_CHANNELS = saved
    assert got is not None
    rows, positions, executed = got
    assert torch.equal(positions, masks[-1].nonzero())
    torch.testing.assert_close(rows, ref.permute(0, 2, 3, 1)[masks[-1]], rtol=1e-4, atol=1e-4)
    expected = sum(m.flatten(1).sum(1).double() * w.numel() for m, w in zip(masks, weights, strict=True))
    torch.testing.assert_close(executed, expected)


@pytest.mark.parametrize("small_gemm", [32, 8, 0])
@pytest.mark.parametrize("chunk_elements", [1, 1 << 12, 1 << 19])
def test_pixel_chain_on_two_threads_counts_its_macs(chunk_elements: int, small_gemm: int, monkeypatch) -> None:
    """On 2 threads the rows are split into chunks per thread (down to the fewest rows a chunk may have); the result
    is the one-thread result, and through the dispatcher op the MAC counter sees exactly the executed MACs. The
    stages (24 and 8 output channels) multiply with dynnet's small GEMM, oneDNN's matmul, or one of each."""
    g = torch.Generator().manual_seed(chunk_elements)
    x = torch.randn(2, 16, 15, 13, generator=g)
    w1, b1 = torch.randn(24, 16, 3, 3, generator=g), torch.randn(24, generator=g)
    w2 = torch.randn(8, 24, 3, 3, generator=g)
    masks = [torch.rand(2, 8, 7, generator=g) < 0.7, torch.rand(2, 8, 7, generator=g) < 0.4]
    mats, geometry = [weight_matrix(w1), weight_matrix(w2)], [(3, 2, 1, 1), (3, 1, 1, 1)]
    monkeypatch.setattr(spatial, "GATHER_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(spatial, "PIXEL_CHAIN_MIN_ROWS", 4)
    monkeypatch.setattr(spatial, "SMALL_GEMM_MAX_CHANNELS", small_gemm)
    threads = torch.get_num_threads()
    try:
        with kernel_engine("native"), torch.no_grad():
            one = pixel_chain(x, masks, mats, [b1, None], geometry, [True, False])
            torch.set_num_threads(2)
            for _ in range(2):  # the second call multiplies by oneDNN's prepacked copies of the matrices
                two = pixel_chain(x, masks, mats, [b1, None], geometry, [True, False])
                torch.testing.assert_close(two[0], one[0], rtol=1e-5, atol=1e-5)
                assert torch.equal(two[1], one[1]) and torch.equal(two[2], one[2])
            with MacCounter() as counter:
                pixel_chain(x, masks, mats, [b1, None], geometry, [True, False])
    finally:
        torch.set_num_threads(threads)
    assert counter.total == int(masks[0].sum()) * w1.numel() + int(masks[1].sum()) * w2.numel()
    assert counter.total == one[2].sum().item()


def test_pixel_chain_declines_what_it_cannot_run() -> None:
    """Gradients, other dtypes and float masks go to the pure-PyTorch path (``None``)."""
    x = torch.randn(1, 2, 5, 5)
    mat = weight_matrix(torch.randn(3, 2, 3, 3))
    mask = torch.ones(1, 5, 5, dtype=torch.bool)
    args = ([(3, 1, 1, 1)], [False])
    with kernel_engine("native"):
        assert pixel_chain(x.requires_grad_(), [mask], [mat], [None], *args) is None
        with torch.no_grad():
            assert pixel_chain(x.double(), [mask], [mat.double()], [None], *args) is None
            assert pixel_chain(x, [mask.float()], [mat], [None], *args) is None
            assert pixel_chain(x, [mask], [mat], [None], *args) is not None
    with kernel_engine("torch"), torch.no_grad():
        assert pixel_chain(x, [mask], [mat], [None], *args) is None


def test_pixel_chain_rejects_bad_operands() -> None:
    with kernel_engine("native"):
        op = torch.ops.dynnet.pixel_chain
        image = torch.randn(1, 5, 5, 2)
        mask = torch.ones(1, 5, 5, dtype=torch.bool)
        w = torch.randn(3, 18)
        ok = (image, [mask], [w], [None], [3], [3, 1, 1, 1], [0], 1 << 19, 32)
        op(*ok)
        cases = {
            "mask of stage 0 must be a contiguous bool Tensor[1, 5, 5]": (image, [mask[:, :4]], *ok[2:]),
            "weight of stage 0 must be Tensor[3, 18]": (image, [mask], [torch.randn(3, 9)], *ok[3:]),
            "one weight, bias": (image, [mask], [w, w], *ok[3:]),
            "image must be a contiguous float32": (image.double(), *ok[1:]),
            "bad geometry": (*ok[:5], [0, 1, 1, 1], *ok[6:]),
        }
        for message, args in cases.items():
            with pytest.raises(RuntimeError, match=re.escape(message)):
                op(*args)


def test_tile_copies_reject_bad_operands() -> None:
    with kernel_engine("native"):
        ext = native.load()
        image = torch.randn(1, 4, 4, 2)
        with pytest.raises(RuntimeError, match="batch index 3 is outside"):
            ext.gather_tile_regions(image, torch.tensor([[3, 0, 0]]), 4, -1, 2)
        with pytest.raises(RuntimeError, match="tiles must be an int64 CPU Tensor"):
            ext.gather_tile_regions(image, torch.tensor([[0, 0]]), 4, -1, 2)
        base = torch.randn(1, 2, 4, 4)
        with pytest.raises(RuntimeError, match="values must be a float32 Tensor"):
            ext.scatter_tiles_add(base, torch.randn(1, 2, 3, 3), torch.tensor([[0, 0, 0]]), 2)
        with pytest.raises(RuntimeError, match="is outside the batch or the grid"):
            ext.scatter_tiles_add(base, torch.randn(1, 2, 2, 2), torch.tensor([[1, 0, 0]]), 2)


def test_narrow_stage_with_a_large_chunk_goes_to_onednn() -> None:
    """A stage narrow enough for dynnet's small GEMM whose chunk exceeds its 2^20-MAC limit is multiplied by oneDNN's
    matmul with the plain weight; both give the masked reference."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, 20, 20, generator=g)
    weight, bias = torch.randn(16, 64, 3, 3, generator=g), torch.randn(16, generator=g)
    for density in (0.05, 0.9):  # about 20 rows (small GEMM) and 360 rows × 576 × 16 > 2^20 MACs (oneDNN)
        mask = torch.rand(1, 20, 20, generator=g) < density
        with kernel_engine("native"), torch.no_grad():
            rows, _, _ = pixel_chain(x, [mask], [weight_matrix(weight)], [bias], [(3, 1, 1, 1)], [True])
        ref = F.conv2d(x, weight, bias, 1, 1).relu().permute(0, 2, 3, 1)[mask]
        torch.testing.assert_close(rows, ref, rtol=1e-4, atol=1e-4)
