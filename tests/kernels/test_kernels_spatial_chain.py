"""The residual-branch engine: pixel and tile execution equal their masked references."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from dynnet.blocks import spatial_chain
from dynnet.convert import find_adapter
from dynnet.kernels.block import gather_tiles, reduce_to_tiles, scatter_tiles, tile_geometry, tiles_to_pixels
from dynnet.kernels.chain import ConvStage, chain_sizes, run_masked, run_pixels, run_tiles, stage_masks
from dynnet.kernels.spatial import scatter_add_rows
from dynnet.macs import MacCounter
from dynnet.models.cifar_resnet import BasicBlock
from dynnet.testing.engines import ENGINES, kernel_engine
from dynnet.testing.masks import make_mask

MANY = settings(max_examples=1000, deadline=None, derandomize=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def _block(c_in: int, c_out: int, stride: int, seed: int) -> BasicBlock:
    torch.manual_seed(seed)
    b = BasicBlock(c_in, c_out, stride)
    with torch.no_grad():  # non-trivial BN statistics, so BN on rows is really tested
        for bn in (b.bn1, b.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return b.eval()


@st.composite
def block_cases(draw):
    c_in, c_out = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    stride = draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    n = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["random", "random", "empty", "full"]))
    density = draw(st.floats(0.0, 1.0))
    tile = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    return c_in, c_out, stride, h, w, n, kind, density, tile, seed


@pytest.mark.parametrize("engine", ENGINES)
@MANY
@given(case=block_cases())
def test_pixel_execution_equals_masked(engine, case) -> None:
    """Compiled (one ``pixel_chain`` call) and pure-PyTorch gather–GEMM chains equal the masked chain."""
    c_in, c_out, stride, h, w, n, kind, density, _, seed = case
    b = _block(c_in, c_out, stride, seed % 1000)
    stages = spatial_chain(b)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g)
    sizes = chain_sizes(stages, (h, w))
    masks = stage_masks(stages, make_mask(kind, density, (n, *sizes[-1]), g), sizes[1:])
    with kernel_engine(engine):
        _assert_pixels_equal_masked(stages, x, masks)


def _assert_pixels_equal_masked(stages: list[ConvStage], x: torch.Tensor, masks: list[torch.Tensor]) -> None:
    """``run_pixels`` scattered back equals ``run_masked``, and executes exactly the masked positions' MACs."""
    with torch.no_grad():
        ref = run_masked(stages, x, list(masks))
        if bool(masks[0].any()):
            rows, positions, executed = run_pixels(stages, x, masks)
            got = scatter_add_rows(torch.zeros_like(ref), rows, positions)
        else:
            got, executed = torch.zeros_like(ref), torch.zeros(x.shape[0], dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    expected = sum(m.flatten(1).sum(1).double() * s.per_position for s, m in zip(stages, masks, strict=True))
    if bool(masks[0].any()):  # a squeeze-excitation runs on every sample's map when the branch runs
        expected = expected + float(sum(s.se_macs for s in stages))
    torch.testing.assert_close(executed, expected)


def _inverted(c_in: int, expand: int, stride: int, seed: int, *, first: bool, squeeze: bool = False) -> list[ConvStage]:
    """MobileNetV2-style stages: [expand 1×1 →] depthwise 3×3 [→ squeeze-excitation, MobileNetV3's] → project 1×1,
    trained-like batch norms, ReLU6."""
    torch.manual_seed(seed)
    hidden = c_in if first else c_in * expand
    convs = [] if first else [nn.Conv2d(c_in, hidden, 1, bias=False)]
    depthwise = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
    convs += [depthwise, nn.Conv2d(hidden, c_in, 1, bias=False)]
    stages = []
    for i, conv in enumerate(convs):
        bn = nn.BatchNorm2d(conv.out_channels).eval()
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        se = None
        if squeeze and conv is depthwise:
            from torchvision.ops.misc import SqueezeExcitation

            se = SqueezeExcitation(hidden, max(1, hidden // 4), scale_activation=nn.Hardsigmoid).eval()
        stages.append(ConvStage(conv.eval(), bn, nn.ReLU6() if i < len(convs) - 1 else None, se))
    return stages


@MANY
@given(case=block_cases(), first=st.booleans())
def test_pixel_execution_of_a_depthwise_chain_equals_masked(case, first: bool) -> None:
    """An inverted residual's chain (the depthwise stage gathered channel by channel; the first when there is no
    expansion) equals the masked chain, and executes exactly the masked positions' MACs."""
    c_in, expand, stride, h, w, n, kind, density, _, seed = case
    stages = _inverted(c_in, expand % 4 + 1, stride, seed % 1000, first=first)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g)
    sizes = chain_sizes(stages, (h, w))
    masks = stage_masks(stages, make_mask(kind, density, (n, *sizes[-1]), g), sizes[1:])
    _assert_pixels_equal_masked(stages, x, masks)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(case=block_cases(), first=st.booleans())
def test_pixel_execution_of_a_squeeze_excitation_chain_equals_masked(case, first: bool) -> None:
    """With a squeeze-excitation after the depthwise stage (pooling the masked map: skipped positions count as 0),
    the gathered rows, scattered back, equal the masked chain; its MACs are a fixed cost per sample."""
    c_in, expand, stride, h, w, n, kind, density, _, seed = case
    stages = _inverted(c_in, expand % 4 + 1, stride, seed % 1000, first=first, squeeze=True)
    assert any(s.se is not None and s.se_macs > 0 for s in stages)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g)
    sizes = chain_sizes(stages, (h, w))
    masks = stage_masks(stages, make_mask(kind, density, (n, *sizes[-1]), g), sizes[1:])
    _assert_pixels_equal_masked(stages, x, masks)


def test_a_squeeze_excitation_chain_is_offered_only_to_callers_that_run_it() -> None:
    from torchvision.models import efficientnet_b0

    block = efficientnet_b0().features[2][1]  # an MBConv with a squeeze-excitation after its depthwise stage
    stages = spatial_chain(block, squeeze=True)
    assert stages is not None and sum(s.se is not None for s in stages) == 1
    assert spatial_chain(block) is None and spatial_chain(block, grouped=True) is None  # halting, tiles


def test_a_grouped_chain_that_is_not_depthwise_is_not_a_pixel_chain() -> None:
    from torchvision.models.resnet import Bottleneck

    resnext = Bottleneck(64, 16, groups=4, base_width=32).eval()  # conv2 grouped, not depthwise
    assert spatial_chain(resnext) is None and spatial_chain(resnext, grouped=True) is not None


@pytest.mark.parametrize("engine", ENGINES)
@MANY
@given(case=block_cases())
def test_tile_execution_equals_masked(engine, case) -> None:
    """Compiled (region gather, border zeroing, tile scatter) and pure-PyTorch tile chains equal the masked one."""
    c_in, c_out, stride, h, w, n, kind, density, tile, seed = case
    b = _block(c_in, c_out, stride, seed % 1000)
    stages = spatial_chain(b)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g)
    ho, wo = chain_sizes(stages, (h, w))[-1]
    tiles_mask = make_mask(kind, density, (n, -(-ho // tile), -(-wo // tile)), g)
    pixel = tiles_to_pixels(tiles_mask, tile, (ho, wo))
    with torch.no_grad(), kernel_engine(engine):
        ref = run_masked(stages, x, [None, pixel])
        tiles = tiles_mask.nonzero()
        values, executed = run_tiles(stages, x, tiles, tile)
        got = scatter_tiles(torch.zeros_like(ref), values, tiles, tile)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    geo = tile_geometry(tile, [s.geometry for s in stages])
    per_tile = sum(r * r * s.per_position for r, s in zip(geo.regions[1:], stages, strict=True))
    torch.testing.assert_close(executed, tiles_mask.flatten(1).sum(1).double() * per_tile)


def test_tile_macs_seen_by_counter() -> None:
    b = _block(4, 6, 2, 0)
    stages = spatial_chain(b)
    x = torch.randn(2, 4, 16, 16)
    tiles_mask = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [1, 0]]], dtype=torch.bool)
    with torch.no_grad(), MacCounter() as counter:
        _, executed = run_tiles(stages, x, tiles_mask.nonzero(), 4)
    assert counter.total == executed.sum().item()
    # conv1 covers a (4+2)² region per tile, conv2 the 4² tile itself: 3 tiles in all.
    assert counter.total == 3 * (36 * 6 * 4 * 9 + 16 * 6 * 6 * 9)


@pytest.mark.parametrize("stride", [1, 2])
def test_tile_execution_of_a_depthwise_inverted_residual_equals_masked(stride: int) -> None:
    """An inverted residual (1×1 expand → 3×3 depthwise → 1×1 project) runs in tiles (and in pixels: a depthwise
    stage is gathered channel by channel)."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(stride)
    block = InvertedResidual(8, 8, stride, expand_ratio=3).eval()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    stages = spatial_chain(block, grouped=True)
    assert spatial_chain(block) == stages  # depthwise: the pixel kernels run it too
    assert [st.conv.groups for st in stages] == [1, 24, 1]
    x = torch.randn(2, 8, 13, 11)
    with torch.no_grad():
        torch.testing.assert_close(run_masked(stages, x, [None] * 3), block.conv(x))  # the branch
        ho, wo = chain_sizes(stages, (13, 11))[-1]
        tiles_mask = make_mask("random", 0.5, (2, -(-ho // 4), -(-wo // 4)), torch.Generator().manual_seed(0))
        ref = run_masked(stages, x, [None, None, tiles_to_pixels(tiles_mask, 4, (ho, wo))])
        tiles = tiles_mask.nonzero()
        with MacCounter() as counter:
            values, executed = run_tiles(stages, x, tiles, 4)
        got = scatter_tiles(torch.zeros_like(ref), values, tiles, 4)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert counter.total == executed.sum().item()


def test_reduce_to_tiles_and_back() -> None:
    mask = torch.zeros(1, 5, 7, dtype=torch.bool)
    mask[0, 4, 6] = True  # the bottom-right partial tile
    tiles = reduce_to_tiles(mask, 4)
    assert tiles.shape == (1, 2, 2) and tiles.sum() == 1 and tiles[0, 1, 1]
    pixels = tiles_to_pixels(tiles, 4, (5, 7))
    assert pixels.shape == (1, 5, 7) and pixels[0, 4:, 4:].all() and pixels.sum() == 3


def test_chain_covers_the_branch_of_known_blocks() -> None:
    import torchvision

    for block in (BasicBlock(4, 8, 2), torchvision.models.resnet.Bottleneck(16, 4, 2, nn.Sequential())):
        stages = spatial_chain(block.eval())
        adapter = find_adapter(block)
        x = torch.randn(2, stages[0].conv.in_channels, 9, 9)
        with torch.no_grad():
            ref = adapter.body(block, x)
            masks = [None] * len(stages)
            torch.testing.assert_close(run_masked(stages, x, masks), ref)


@pytest.mark.parametrize("engine", ENGINES)
def test_stride_in_a_later_stage(engine) -> None:
    """torchvision's Bottleneck strides in its second stage: each stage's mask has that stage's output size, and
    the active outputs equal the dense branch there (pixel and masked execution)."""
    import torchvision

    torch.manual_seed(0)
    block = torchvision.models.resnet.Bottleneck(16, 4, 2, nn.Sequential()).eval()
    stages = spatial_chain(block)
    x = torch.randn(2, 16, 9, 9)
    sizes = chain_sizes(stages, (9, 9))
    out_mask = torch.rand(2, *sizes[-1], generator=torch.Generator().manual_seed(1)) < 0.4
    masks = stage_masks(stages, out_mask, sizes[1:])
    assert [tuple(m.shape[1:]) for m in masks] == sizes[1:]
    with torch.no_grad(), kernel_engine(engine):
        dense = find_adapter(block).body(block, x)
        ref = run_masked(stages, x, list(masks))
        rows, positions, _ = run_pixels(stages, x, masks)
        got = scatter_add_rows(torch.zeros_like(ref), rows, positions)
    keep = out_mask.unsqueeze(1)
    torch.testing.assert_close(ref, dense * keep, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_folded_weights_follow_parameter_updates() -> None:
    b = _block(3, 4, 1, 0)
    stages = spatial_chain(b)
    x = torch.randn(1, 3, 6, 6)
    masks = stage_masks(stages, torch.ones(1, 6, 6, dtype=torch.bool), [(6, 6), (6, 6)])
    with torch.no_grad():
        run_pixels(stages, x, masks)  # fills the cache
        b.bn1.running_mean.add_(0.3)  # an in-place update must invalidate it
        b.conv2.weight.mul_(2.0)
        rows, positions, _ = run_pixels(stages, x, masks)
        ref = run_masked(stages, x, [None, None])
    torch.testing.assert_close(scatter_add_rows(torch.zeros_like(ref), rows, positions), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", [nn.ReLU(inplace=True), nn.SiLU(), None])
@pytest.mark.parametrize("grad", [False, True])
def test_pixel_execution_any_activation_and_autograd(act, grad: bool) -> None:
    """The intermediate rows (ReLU written into the zero-row buffer, other activations, autograd) match."""
    b = _block(5, 6, 1, 1)
    stages = [ConvStage(b.conv1, b.bn1, act), ConvStage(b.conv2, b.bn2, None)]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 7, 7, generator=g, requires_grad=grad)
    masks = stage_masks(stages, torch.rand(2, 7, 7, generator=g) < 0.4, [(7, 7), (7, 7)])
    with torch.set_grad_enabled(grad):
        rows, positions, _ = run_pixels(stages, x, masks)
        ref = run_masked(stages, x, list(masks))
    got = scatter_add_rows(torch.zeros_like(ref), rows, positions)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    if grad:
        got.sum().backward()
        assert x.grad is not None


@pytest.mark.parametrize("engine", ENGINES)
@MANY
@given(case=block_cases(), channels_last=st.booleans())
def test_gather_tiles_equals_padded_slices(engine, case, channels_last: bool) -> None:
    """Each gathered region is the zero-padded input cut at the tile's origin (halo outside the image: zeros)."""
    c_in, _, stride, h, w, n, _, density, tile, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tiles = (torch.rand(n, -(-h // tile), -(-w // tile), generator=g) < density).nonzero()
    region, offset, step = tile + 2 * stride, -stride, tile
    with kernel_engine(engine):
        got = gather_tiles(x, tiles, region, offset, step)
    pad = region + step
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    assert got.shape == (tiles.shape[0], c_in, region, region)
    for t, (b, ty, tx) in enumerate(tiles.tolist()):
        y0, x0 = ty * step + offset + pad, tx * step + offset + pad
        torch.testing.assert_close(got[t], xp[b, :, y0 : y0 + region, x0 : x0 + region])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_scatter_tiles_keeps_base_and_its_format(engine, memory_format) -> None:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 3, 5, 7, generator=g).contiguous(memory_format=memory_format)
    before = base.clone()
    tiles = torch.tensor([[0, 1, 1], [1, 0, 0]])  # the first sticks out of the 5×7 image
    values = torch.randn(2, 3, 4, 4, generator=g)
    with kernel_engine(engine):
        out = scatter_tiles(base, values, tiles, 4)
    torch.testing.assert_close(base, before)
    assert out.is_contiguous(memory_format=memory_format)
    expected = before.clone()
    expected[0, :, 4:5, 4:7] += values[0, :, :1, :3]
    expected[1, :, 0:4, 0:4] += values[1]
    torch.testing.assert_close(out, expected)


def test_dense_fallback_equals_masked_and_counts_dense_macs() -> None:
    """Above ``dense_above`` sparse mode runs the masked dense path: same output, executed MACs = the dense branch."""
    import dynnet
    from dynnet.blocks import SpatialResidual
    from dynnet.testing import diverse_inputs, scramble_until_mixed

    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="dynconv", num_classes=10)
    x = diverse_inputs(4, (3, 32, 32))
    scramble_until_mixed(model, x)
    model.eval()
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    dynnet.sparse(model)
    blocks = [b for b in model.modules() if isinstance(b, SpatialResidual)]
    for b in blocks:
        b.dense_above = -1.0  # always fall back
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as counter:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ts.macs(), tm.macs())  # theoretical MACs follow the decisions either way
    assert ts.executed_macs().sum().item() == pytest.approx(counter.total, abs=0.5)
    assert (ts.executed_macs() > ts.macs()).all()  # the fallback executes the dense branch
    for b in blocks:
        b.dense_above = 1.0
    with torch.no_grad(), dynnet.trace() as tg:
        model(x)
    torch.testing.assert_close(tg.executed_macs(), tg.macs())


def test_calibrate_dense_fallback_sets_every_gated_pixel_block_and_restores_modes() -> None:
    import dynnet
    from dynnet.blocks import SpatialResidual, calibrate_dense_fallback_

    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="dynconv", num_classes=10, width=0.25)
    model.train()
    dynnet.set_mode(model, "masked")
    choice = calibrate_dense_fallback_(model, torch.randn(2, 3, 16, 16), min_run_time=0.01)
    blocks = [b for b in model.modules() if isinstance(b, SpatialResidual)]
    assert set(choice) == {b.block_name for b in blocks}
    assert all(0.0 <= v <= 1.0 for v in choice.values())
    assert [b.dense_above for b in blocks] == [choice[b.block_name] for b in blocks]
    assert model.training and all(b.mode == "masked" for b in blocks)
