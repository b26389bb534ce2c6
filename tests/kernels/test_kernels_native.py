"""The compiled extension: it builds where a compiler is present, gathers exactly what the reference gathers,
rejects bad indices with a clear error, and its absence falls back to the pure-PyTorch path with a warning."""

from __future__ import annotations

import shutil
import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from dynnet.kernels import native
from dynnet.kernels.spatial import gather_conv2d, masked_conv2d_reference
from dynnet.testing.engines import kernel_engine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler here")
def test_extension_builds_where_a_compiler_is_present(monkeypatch) -> None:
    monkeypatch.delenv("DYNNET_NATIVE", raising=False)
    assert native.status() == "available"
    assert hasattr(native.load(), "gather_im2col")


def _reference_im2col(rows, lookup, positions, k, s, p, d):
    """Tensor[P, k·k·C] by plain indexing (the definition)."""
    _, h, w = lookup.shape
    c = rows.shape[1]
    out = torch.zeros(positions.shape[0], k * k * c)
    for i, (b, oh, ow) in enumerate(positions.tolist()):
        for ky in range(k):
            for kx in range(k):
                ih, iw = oh * s - p + ky * d, ow * s - p + kx * d
                if 0 <= ih < h and 0 <= iw < w and lookup[b, ih, iw] >= 0:
                    out[i, (ky * k + kx) * c : (ky * k + kx + 1) * c] = rows[lookup[b, ih, iw]]
    return out


@pytest.mark.parametrize("geometry", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (3, 1, 2, 2), (5, 2, 2, 1)])
def test_gather_im2col_equals_indexing(geometry) -> None:
    with kernel_engine("native"):
        ext = native.load()
        k, s, p, d = geometry
        g = torch.Generator().manual_seed(sum(geometry))
        rows = torch.randn(30, 5, generator=g)
        lookup = torch.randint(-1, 30, (2, 7, 6), generator=g)
        positions = torch.tensor([[0, 0, 0], [1, 2, 3], [0, 1, 1], [1, 0, 2]])
        got = ext.gather_im2col(rows, lookup, positions, 0, 4, k, s, p, d)
        torch.testing.assert_close(got, _reference_im2col(rows, lookup, positions, k, s, p, d), rtol=0, atol=0)
        part = ext.gather_im2col(rows, lookup, positions, 1, 3, k, s, p, d)
        torch.testing.assert_close(part, got[1:3], rtol=0, atol=0)
        image = torch.randn(2, 7, 6, 5, generator=g)
        ident = torch.arange(2 * 7 * 6).view(2, 7, 6)
        torch.testing.assert_close(
            ext.gather_im2col_image(image, positions.t().contiguous().t(), 0, 4, k, s, p, d),
            _reference_im2col(image.reshape(-1, 5), ident, positions, k, s, p, d),
            rtol=0,
            atol=0,
        )


def test_gather_im2col_rejects_bad_indices() -> None:
    with kernel_engine("native"):
        ext = native.load()
        rows = torch.randn(4, 3)
        lookup = torch.full((1, 3, 3), 9)  # row 9 of 4
        with pytest.raises(RuntimeError, match="lookup names a row outside"):
            ext.gather_im2col(rows, lookup, torch.tensor([[0, 1, 1]]), 0, 1, 3, 1, 1, 1)
        with pytest.raises(RuntimeError, match="batch index is outside"):
            ext.gather_im2col(rows, lookup.clamp(max=3), torch.tensor([[2, 1, 1]]), 0, 1, 3, 1, 1, 1)
        with pytest.raises(RuntimeError, match="float32"):
            ext.gather_im2col(rows.double(), lookup, torch.tensor([[0, 1, 1]]), 0, 1, 3, 1, 1, 1)
        with pytest.raises(RuntimeError, match="bad range"):
            ext.gather_im2col(rows, lookup, torch.tensor([[0, 1, 1]]), 0, 2, 3, 1, 1, 1)


def test_unbuildable_extension_falls_back_with_a_warning(monkeypatch) -> None:
    monkeypatch.delenv("DYNNET_NATIVE", raising=False)
    monkeypatch.setattr(native, "_state", {})

    def fail(verbose: bool):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(native, "_build", fail)
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 3, 6, 6, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    mask = torch.rand(1, 6, 6, generator=g) < 0.5
    with pytest.warns(RuntimeWarning, match="Ninja is required.*pip install ninja"):
        rows = gather_conv2d(x, weight, mask, padding=1)
    torch.testing.assert_close(rows, masked_conv2d_reference(x, weight, mask, padding=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not on every call
        gather_conv2d(x, weight, mask, padding=1)
    assert native.status().startswith("unavailable: RuntimeError: Ninja is required")


def test_disabled_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("DYNNET_NATIVE", "0")
    assert native.load() is None
    assert native.status() == "disabled (DYNNET_NATIVE=0)"


def test_gradients_take_the_reference_path() -> None:
    """The compiled gather has no backward: with a gradient to record, the differentiable path runs."""
    with kernel_engine("native"):
        x = torch.randn(1, 2, 5, 5, requires_grad=True)
        weight = torch.randn(3, 2, 3, 3, requires_grad=True)
        mask = torch.ones(1, 5, 5, dtype=torch.bool)
        gather_conv2d(x, weight, mask, padding=1).sum().backward()
        ref_x = x.detach().clone().requires_grad_(True)
        masked_conv2d_reference(ref_x, weight.detach(), mask, padding=1).sum().backward()
        torch.testing.assert_close(x.grad, ref_x.grad)


@st.composite
def pair_cases(draw):
    c, m, c_out = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.integers(1, 24))
    h, w = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    stride = draw(st.sampled_from([1, 2]))
    kind = draw(st.sampled_from(["random", "none", "all"]))
    binary = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return c, m, c_out, h, w, stride, kind, binary, seed


def _kept(kind: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """A bool channel mask of ``kind`` "random" (each kept with probability 1/2), "none" or "all"."""
    random = torch.rand(shape, generator=g) < 0.5
    if kind == "random":
        return random
    return torch.zeros(shape, dtype=torch.bool) if kind == "none" else torch.ones(shape, dtype=torch.bool)


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(pair_cases())
def test_sliced_pair3x3_equals_the_sliced_reference(case) -> None:
    """The compiled batch-1 pair computes exactly what the pure-PyTorch slices compute, and counts its MACs."""
    from dynnet.kernels.channel import ConvSpec, sliced_pair_single
    from dynnet.macs import MacCounter

    c, m, c_out, h, w, stride, kind, binary, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c, h, w, generator=g)
    w1, b1 = torch.randn(m, c, 3, 3, generator=g), torch.randn(m, generator=g)
    w2, b2 = torch.randn(c_out, m, 3, 3, generator=g), torch.randn(c_out, generator=g)
    keep = _kept(kind, (m,), g)
    scale = keep.float() * (torch.rand(m, generator=g) + 0.5)
    spec1, spec2 = ConvSpec((stride, stride), (1, 1), (1, 1)), ConvSpec((1, 1), (1, 1), (1, 1))
    with kernel_engine("torch"):
        ref, k_ref = sliced_pair_single(x, w1, b1, w2, b2, scale, spec1, spec2, binary=binary)
    with kernel_engine("native"), MacCounter() as counter:
        got, k = sliced_pair_single(x, w1, b1, w2, b2, scale, spec1, spec2, binary=binary)
    assert k == k_ref == int(keep.sum())
    torch.testing.assert_close(got, ref.expand_as(got), rtol=1e-4, atol=1e-4)
    assert counter.total == k * (c + c_out) * 9 * got.shape[2] * got.shape[3]
    # The fused block epilogue: relu(residual + pair), on both engines.
    residual = torch.randn(got.shape, generator=g)
    block = {"binary": binary, "residual": residual, "relu": True}
    with kernel_engine("native"):
        fused, _ = sliced_pair_single(x, w1, b1, w2, b2, scale, spec1, spec2, **block)
    with kernel_engine("torch"):
        plain, _ = sliced_pair_single(x, w1, b1, w2, b2, scale, spec1, spec2, **block)
    torch.testing.assert_close(fused, torch.relu(residual + ref), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain, torch.relu(residual + ref), rtol=1e-4, atol=1e-4)


def test_sliced_pair3x3_rejects_bad_arguments() -> None:
    with kernel_engine("native"):
        op = torch.ops.dynnet.sliced_pair3x3
        x, w1, b1 = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3), torch.randn(6)
        w2, b2, s = torch.randn(3, 6, 3, 3), torch.randn(3), torch.ones(6)
        with pytest.raises(RuntimeError, match="one sample"):
            op(torch.randn(2, 4, 5, 5), w1, b1, w2, b2, s, True, 1)
        with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
            op(x, w1, b1, w2, b2, s, True, 3)
        with pytest.raises(RuntimeError, match="w2 must be"):
            op(x, w1, b1, torch.randn(3, 5, 3, 3), b2, s, True, 1)
        with pytest.raises(RuntimeError, match="float32"):
            op(x.double(), w1, b1, w2, b2, s, True, 1)


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(pair_cases())
def test_conv3x3_in_equals_the_sliced_reference(case) -> None:
    """The compiled input-sliced convolution equals ``sliced_conv_in``'s PyTorch path and counts its MACs."""
    from dynnet.kernels.channel import ConvSpec, native_conv3x3_in, sliced_conv_in
    from dynnet.macs import MacCounter

    c, _, c_out, h, w, stride, kind, _, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c, h, w, generator=g)
    weight, bias = torch.randn(c_out, c, 3, 3, generator=g), torch.randn(c_out, generator=g)
    active = _kept(kind, (1, c), g)
    spec = ConvSpec((stride, stride), (1, 1), (1, 1))
    with kernel_engine("torch"):
        ref, k_ref = sliced_conv_in(x, weight, bias, active, spec)
    with kernel_engine("native"), MacCounter() as counter:
        got, k = sliced_conv_in(x, weight, bias, active, spec)
        full, k_full = native_conv3x3_in(x, weight, bias, None, spec)
    assert float(k) == float(k_ref) == int(active.sum())
    torch.testing.assert_close(got, ref.expand_as(got), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full, torch.nn.functional.conv2d(x, weight, bias, stride, 1), rtol=1e-4, atol=1e-4)
    assert k_full == c
    assert counter.total == (int(active.sum()) + c) * c_out * 9 * got.shape[2] * got.shape[3]
