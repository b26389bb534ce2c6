"""Channel-sliced kernels against the dense reference and the aten-level MAC counter."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dynnet.core import version_key
from dynnet.kernels.channel import (
    STRATEGIES,
    ConvSpec,
    choose_strategy,
    fold_bn,
    gated_pair_reference,
    gated_rest_add_,
    gated_rest_conv,
    sliced_conv_in,
    sliced_pair,
    sliced_pair_single,
)
from dynnet.macs import MacCounter


def _pair(cin: int = 3, c: int = 6, cout: int = 5, stride: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    c1, c2 = nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.Conv2d(c, cout, 3, 1, 1, bias=False)
    b1, b2 = nn.BatchNorm2d(c).eval(), nn.BatchNorm2d(cout).eval()
    with torch.no_grad():
        for b in (b1, b2):
            b.running_mean.normal_()
            b.running_var.uniform_(0.5, 2.0)
            b.weight.normal_()
            b.bias.normal_()
    return c1, b1, c2, b2


def test_fold_bn_matches_conv_then_bn() -> None:
    c1, b1, _, _ = _pair()
    x = torch.randn(2, 3, 7, 7)
    w, b = fold_bn(c1, b1)
    torch.testing.assert_close(ConvSpec.of(c1).conv(x, w, b), b1(c1(x)), rtol=1e-5, atol=1e-5)


def test_fold_bn_refuses_training_bn() -> None:
    c1, b1, _, _ = _pair()
    with pytest.raises(ValueError, match="eval mode"):
        fold_bn(c1, b1.train())


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 5),
    stride=st.sampled_from([1, 2]),
    density=st.floats(0.0, 1.0),
    boost=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_every_strategy_matches_the_dense_reference(
    n: int, stride: int, density: float, boost: bool, seed: int
) -> None:
    c1, b1, c2, b2 = _pair(stride=stride)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    on = torch.rand(n, 6, generator=g) < density
    scale = on.float() * (torch.rand(n, 6, generator=g) + 0.5 if boost else 1.0)
    w1, bb1 = fold_bn(c1, b1)
    w2, bb2 = fold_bn(c2, b2)
    s1, s2 = ConvSpec.of(c1), ConvSpec.of(c2)
    ref = b2(c2(torch.relu(b1(c1(x))) * scale[:, :, None, None]))
    torch.testing.assert_close(gated_pair_reference(x, w1, bb1, w2, bb2, scale, s1, s2), ref, rtol=1e-4, atol=1e-4)
    for strategy in STRATEGIES:
        y, executed = sliced_pair(x, w1, bb1, w2, bb2, scale, s1, s2, binary=not boost, strategy=strategy)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4, msg=strategy)
        counts = on.sum(1).double()
        how = choose_strategy(on, strategy)
        expected = {"dense": torch.full_like(counts, 6.0), "padded": torch.full_like(counts, float(counts.max()))}
        torch.testing.assert_close(executed, expected.get(how, counts), msg=strategy)


@pytest.mark.parametrize("strategy", ["groups", "per_sample", "padded"])
def test_executed_channels_match_the_mac_counter(strategy: str) -> None:
    c1, b1, c2, b2 = _pair(cin=4, c=8, cout=6, stride=2)
    x = torch.randn(3, 4, 10, 10)
    on = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0, 1], [0] * 8], dtype=torch.bool)
    w1, bb1 = fold_bn(c1, b1)
    w2, bb2 = fold_bn(c2, b2)
    with torch.no_grad(), MacCounter() as counter:
        _, executed = sliced_pair(x, w1, bb1, w2, bb2, on.float(), ConvSpec.of(c1), ConvSpec.of(c2), strategy=strategy)
    # Analytic: one inner channel costs 9·C_in·5·5 (conv1, stride 2) + 9·C_out·5·5 (conv2) MACs.
    per_channel = 9 * 4 * 25 + 9 * 6 * 25
    assert counter.total == int(executed.sum()) * per_channel
    if strategy != "padded":
        assert executed.tolist() == [3.0, 6.0, 0.0]


def test_input_side_slicing_matches_reference_and_counter() -> None:
    _, _, c2, b2 = _pair(c=8, cout=6)
    h = torch.relu(torch.randn(4, 8, 6, 6))
    on = torch.rand(4, 8, generator=torch.Generator().manual_seed(3)) < 0.5
    w2, bb2 = fold_bn(c2, b2)
    ref = b2(c2(h * on[:, :, None, None]))
    for strategy in STRATEGIES:
        with torch.no_grad(), MacCounter() as counter:
            y, executed = sliced_conv_in(h, w2, bb2, on, ConvSpec.of(c2), strategy=strategy)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4, msg=strategy)
        assert counter.total == int(executed.sum()) * 9 * 6 * 36


def test_choose_strategy() -> None:
    assert choose_strategy(torch.ones(4, 8, dtype=torch.bool)) == "dense"
    assert choose_strategy(torch.tensor([[True, False]])) == "groups"
    same_count = torch.eye(8, dtype=torch.bool)  # 8 distinct masks, one channel each: no padding waste
    assert choose_strategy(same_count) == "padded"
    nested = torch.arange(8)[None, :] < torch.tensor([2, 2, 2, 2, 2, 2, 2, 8, 8, 8, 8, 8, 8, 8, 8, 8])[:, None]
    assert choose_strategy(nested) == "groups"
    with pytest.raises(ValueError, match="strategy"):
        choose_strategy(same_count, "fastest")


@pytest.mark.parametrize("stride", [1, 2])
def test_gated_rest_conv_computes_only_gated_entries(stride: int) -> None:
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(5, 4, 3, stride, 1, bias=False)
    x = torch.randn(2, 5, 7, 7, generator=g)
    ho = (7 + 2 - 3) // stride + 1
    gate = torch.rand(2, 4, ho, ho, generator=g) < 0.3
    with torch.no_grad(), MacCounter() as counter:
        y = gated_rest_conv(x, conv.weight, gate, ConvSpec.of(conv))
    torch.testing.assert_close(y, conv(x) * gate, rtol=1e-5, atol=1e-5)
    assert counter.total == int(gate.sum()) * 5 * 9
    empty = gated_rest_conv(x, conv.weight, torch.zeros_like(gate), ConvSpec.of(conv))
    assert empty.shape == y.shape and not empty.any()


@pytest.mark.parametrize("kept", ["all", "none", "some"])
@pytest.mark.parametrize("boost", [False, True])
def test_single_sample_path_matches_the_reference(kept: str, boost: bool) -> None:
    c1, b1, c2, b2 = _pair(stride=2)
    x = torch.randn(1, 3, 9, 9)
    on = {"all": torch.ones(1, 6), "none": torch.zeros(1, 6), "some": torch.tensor([[1.0, 0, 0, 1, 1, 0]])}[kept]
    values = torch.rand(1, 6) + 0.5
    scale = on * values if boost else on
    w1, bb1 = fold_bn(c1, b1)
    w2, bb2 = fold_bn(c2, b2)
    s1, s2 = ConvSpec.of(c1), ConvSpec.of(c2)
    ref = gated_pair_reference(x, w1, bb1, w2, bb2, scale, s1, s2)
    with torch.no_grad(), MacCounter() as counter:
        y, k = sliced_pair_single(x, w1, bb1, w2, bb2, scale, s1, s2, binary=not boost)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert k == int(on.sum())
    assert counter.total == k * (9 * 3 * 25 + 9 * 5 * 25)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_binary_scale_only_reads_the_non_zero_positions(strategy: str) -> None:
    c1, b1, c2, b2 = _pair()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g)
    on = torch.rand(4, 6, generator=g) < 0.5
    w1, bb1 = fold_bn(c1, b1)
    w2, bb2 = fold_bn(c2, b2)
    s1, s2 = ConvSpec.of(c1), ConvSpec.of(c2)
    ref = gated_pair_reference(x, w1, bb1, w2, bb2, on.float(), s1, s2)
    logits_like = on.float() * (torch.rand(4, 6, generator=g) + 0.1)  # e.g. relu(logits): non-zero where kept
    for xs, ss, r in ((x, logits_like, ref), (x[:1], logits_like[:1], ref[:1])):
        y, _ = sliced_pair(xs, w1, bb1, w2, bb2, ss, s1, s2, binary=True, strategy=strategy)
        torch.testing.assert_close(y, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dense_density", [0.0, 0.3, 2.0])
@pytest.mark.parametrize("density", [0.0, 0.2, 0.7, 1.0])
@pytest.mark.parametrize("stride", [1, 2])
def test_gated_rest_add_matches_the_masked_sum_and_the_counter(
    dense_density: float, density: float, stride: int
) -> None:
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(5, 4, 3, stride, 1, bias=False)
    x = torch.randn(2, 5, 7, 7, generator=g)
    ho = (7 + 2 - 3) // stride + 1
    gate = (torch.rand(2, 4, ho, ho, generator=g) < density).float()
    gate[:, 0] = 0.0  # a channel with no kept entry
    p = torch.randn(2, 4, ho, ho, generator=g)
    expected = p + gate * conv(x).detach()
    with torch.no_grad(), MacCounter() as counter:
        y, executed = gated_rest_add_(
            p.clone(), x, conv.weight.detach(), gate, ConvSpec.of(conv), dense_density=dense_density
        )
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert counter.total == int(executed.sum()) * 5 * 9
    assert (executed >= gate.flatten(1).sum(1).double()).all()  # a superset of the gated entries
    if dense_density == 0.0:  # every channel with a kept entry is computed everywhere
        per_channel = (gate.sum((0, 2, 3)) > 0).sum() * ho * ho
        torch.testing.assert_close(executed, torch.full((2,), float(per_channel), dtype=torch.float64))


def test_version_key_tracks_in_place_edits_and_refuses_inference_tensors() -> None:
    w = torch.randn(3)
    key = version_key(w, None)
    assert version_key(w, None) == key
    w.add_(1.0)
    assert version_key(w, None) != key
    with torch.inference_mode():
        assert version_key(torch.randn(3)) is None
    assert version_key(torch.empty(3, device="meta")) is None
