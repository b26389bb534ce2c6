"""The compiled tile-gated block (channel gating, Hua et al., one sample): it takes the decisions the PyTorch
reference takes, computes the reference's output for them, counts exactly the MACs of the gated-on entries, and
rejects bad operands with a clear error."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from dynnet.kernels.channel import (
    TILE,
    ConvSpec,
    gated_rest_add_,
    tile_gated_pair_macs,
    tile_gated_pair_op,
    tile_gated_pair_reference,
    tile_gated_rest_add_,
    tiles_on,
    upsample_tiles,
)
from dynnet.macs import MacCounter
from dynnet.testing.engines import kernel_engine

pytestmark = pytest.mark.usefixtures("one_thread")

MARGIN = 1e-3  # tiles whose mean is this close to the threshold may round either way; they are not compared


def _operands(g: torch.Generator, c: int, m: int, c_out: int, density: float) -> tuple:
    """Random block operands whose thresholds put about ``density`` of the tiles on (for unit-variance sums)."""
    w1, b1 = torch.randn(m, c, 3, 3, generator=g) / 3, torch.randn(m, generator=g)
    w2, b2 = torch.randn(c_out, m, 3, 3, generator=g) / 3, torch.randn(c_out, generator=g)
    quantile = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(min(max(1 - density, 1e-6), 1 - 1e-6)))
    thr1 = quantile * 0.5 + 0.3 * torch.randn(m, generator=g)
    thr2 = quantile * 0.5 + 0.3 * torch.randn(c_out, generator=g)
    k1, c1 = torch.rand(m, generator=g) + 0.5, torch.randn(m, generator=g) * 0.2
    k2, c2 = torch.rand(c_out, generator=g) + 0.5, torch.randn(c_out, generator=g) * 0.2
    return w1, b1, thr1, k1, c1, w2, b2, thr2, k2, c2


def _tile_means(p: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(p, TILE, ceil_mode=True)[0]


@st.composite
def tile_cases(draw):
    c, m, c_out = draw(st.integers(2, 24)), draw(st.integers(2, 24)), draw(st.integers(1, 24))
    h, w = draw(st.integers(1, 18)), draw(st.integers(1, 18))
    stride = draw(st.sampled_from([1, 2]))
    base1, base2 = draw(st.integers(1, c - 1)), draw(st.integers(1, m - 1))  # GatedConv: base < C_in
    density = draw(st.sampled_from([0.0, 0.1, 0.3, 0.6, 1.0]))
    shortcut = draw(st.sampled_from(["none", "residual", "projection"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return c, m, c_out, h, w, stride, base1, base2, density, shortcut, seed


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(tile_cases())
def test_tile_gated_pair_decides_and_computes_as_the_reference(case) -> None:
    c, m, c_out, h, w, stride, base1, base2, density, shortcut, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c, h, w, generator=g)
    w1, b1, thr1, k1, c1, w2, b2, thr2, k2, c2 = _operands(g, c, m, c_out, density)
    if density in (0.0, 1.0):  # every tile off / on: the empty and full decisions
        thr1, thr2 = (torch.full_like(t, 1e9 if density == 0.0 else -1e9) for t in (thr1, thr2))
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    residual, sw, sb = None, None, None
    if shortcut == "residual":
        residual = torch.randn(1, c_out, ho, wo, generator=g)
    elif shortcut == "projection":
        sw, sb = torch.randn(c_out, c, generator=g), torch.randn(c_out, generator=g)
    with kernel_engine("native"):
        op = tile_gated_pair_op()
        with MacCounter() as counter:
            a1, a2 = torch.stack([b1, thr1, k1, c1]), torch.stack([b2, thr2, k2, c2])
            y, mask1, mask2, e1, e2 = op(x, w1, a1, base1, w2, a2, base2, stride, residual, sw, sb)
    th, tw = -(-ho // TILE), -(-wo // TILE)
    assert mask1.shape == (m, th, tw) and mask2.shape == (c_out, th, tw)
    # conv1's decisions: those of the reference's base partial sum, away from the threshold.
    p1 = F.conv2d(x[:, :base1], w1[:, :base1], b1, stride, 1)
    means1 = _tile_means(p1)
    clear1 = (means1 - thr1.view(-1, 1, 1)).abs() > MARGIN
    torch.testing.assert_close(mask1[clear1], (means1 > thr1.view(-1, 1, 1)).float()[clear1])
    # The output is the reference computed with the decisions the kernel took.
    res = residual
    if sw is not None:
        res = F.conv2d(x, sw.view(c_out, c, 1, 1), sb, stride)
    on1 = mask1.repeat_interleave(TILE, 1).repeat_interleave(TILE, 2)[None, :, :ho, :wo]
    y1 = p1 + on1 * F.conv2d(x[:, base1:], w1[:, base1:], None, stride, 1)
    hidden = torch.relu(k1.view(1, -1, 1, 1) * y1 + c1.view(1, -1, 1, 1))
    p2 = F.conv2d(hidden[:, :base2], w2[:, :base2], b2, 1, 1)
    means2 = _tile_means(p2)
    clear2 = (means2 - thr2.view(-1, 1, 1)).abs() > MARGIN
    torch.testing.assert_close(mask2[clear2], (means2 > thr2.view(-1, 1, 1)).float()[clear2])
    on2 = mask2.repeat_interleave(TILE, 1).repeat_interleave(TILE, 2)[None, :, :ho, :wo]
    y2 = p2 + on2 * F.conv2d(hidden[:, base2:], w2[:, base2:], None, 1, 1)
    ref = k2.view(1, -1, 1, 1) * y2 + c2.view(1, -1, 1, 1)
    ref = torch.relu(ref if res is None else ref + res)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    # Gated-on entries and MACs: exactly the on tiles' positions inside the output.
    assert e1 == int(on1.sum()) and e2 == int(on2.sum())
    macs = (m * base1 + c_out * base2) * 9 * ho * wo + (e1 * (c - base1) + e2 * (m - base2)) * 9
    assert counter.total == macs + (0 if sw is None else c_out * c * ho * wo)
    assert counter.total == tile_gated_pair_macs(x, w1, base1, w2, base2, y, e1, e2, sw)
    if bool(clear1.all()) and bool(clear2.all()):  # no decision near its threshold: the whole reference agrees
        expected, m1, m2 = tile_gated_pair_reference(
            x, w1, b1, thr1, k1, c1, base1, w2, b2, thr2, k2, c2, base2, stride, res
        )  # fmt: skip
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(mask1, m1) and torch.equal(mask2, m2)


def test_tile_gated_pair_rejects_bad_operands() -> None:
    with kernel_engine("native"):
        op = tile_gated_pair_op()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 6, 6, generator=g)
        w1, b1, thr1, k1, c1, w2, b2, thr2, k2, c2 = _operands(g, 4, 6, 5, 0.5)
        a1, a2 = torch.stack([b1, thr1, k1, c1]), torch.stack([b2, thr2, k2, c2])
        args = [x, w1, a1, 1, w2, a2, 2, 1]
        with pytest.raises(RuntimeError, match="one sample"):
            op(torch.randn(2, 4, 6, 6), *args[1:])
        with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
            op(*args[:-1], 3)
        with pytest.raises(RuntimeError, match=r"w2 must be \[C_out, 6, 3, 3\]"):
            op(*args[:4], torch.randn(5, 5, 3, 3), *args[5:])
        with pytest.raises(RuntimeError, match=r"a1 must be \[4, 6\] \(bias, threshold, scale, shift\)"):
            op(*args[:2], a1[:3], *args[3:])
        with pytest.raises(RuntimeError, match="base groups must be in"):
            op(*args[:3], 0, *args[4:])
        with pytest.raises(RuntimeError, match=r"residual must be \[1, 5, 6, 6\]"):
            op(*args, torch.randn(1, 5, 3, 3))
        with pytest.raises(RuntimeError, match="a shortcut needs shortcut_b and no residual"):
            op(*args, None, torch.randn(5, 4))
        with pytest.raises(RuntimeError, match="float32"):
            op(x.double(), *args[1:])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 4),
    c_out=st.integers(1, 12),
    size=st.tuples(st.integers(1, 17), st.integers(1, 17)),
    tile=st.sampled_from([1, 2, 4]),
    stride=st.sampled_from([1, 2]),
    density=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_window_gated_rest_adds_the_rest_where_the_upsampled_windows_are_on(
    n: int, c_out: int, size: tuple[int, int], tile: int, stride: int, density: float, channels_last: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    spec = ConvSpec(stride=(stride, stride), padding=(1, 1), dilation=(1, 1))
    x_rest, w_rest = torch.randn(n, 5, *size, generator=g), torch.randn(c_out, 5, 3, 3, generator=g)
    p = torch.randn(n, c_out, -(-size[0] // stride), -(-size[1] // stride), generator=g)
    threshold = torch.randn(c_out, generator=g) * 0.3 + (0.0 if density == 0.6 else 1e9 if density == 0 else -1e9)
    if density == 0.2:
        threshold[: c_out // 2] = 1e9  # channels that no window keeps: not computed
    on = tiles_on(p, threshold, tile)
    assert on.shape[2:] == (-(-p.shape[2] // tile), -(-p.shape[3] // tile))
    mask = upsample_tiles(on, tile, p.shape[2:])
    expected, _ = gated_rest_add_(p.clone(), x_rest, w_rest, mask, spec, dense_density=0.0)
    torch.testing.assert_close(expected, p + mask * spec.conv(x_rest, w_rest))  # the reference is the masked sum
    if channels_last:  # the strided window view follows any memory format
        x_rest = x_rest.contiguous(memory_format=torch.channels_last)
    out = tile_gated_rest_add_(p.clone(), x_rest, w_rest, on, tile, spec)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    pooled = p if tile == 1 else F.avg_pool2d(p, tile, ceil_mode=True)
    assert torch.equal(on, pooled > threshold.view(1, -1, 1, 1))  # the window mean decides
