"""The channel family on Bottleneck (torchvision ResNet) and inverted residual (MobileNetV2) blocks (issue #20)."""

from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch
import torchvision
from torchvision.models.resnet import Bottleneck, ResNet

import dynnet
from dynnet.core import RECIPES
from dynnet.kernels.channel import (
    STRATEGIES,
    ConvSpec,
    ExpandedConvs,
    SqueezeExcite,
    expanded_reference,
    mlp_reference,
    sliced_expanded,
    sliced_mlp,
)
from dynnet.macs import MacCounter
from dynnet.methods.channel import ChannelGatedBlock
from dynnet.testing import diverse_inputs, scramble_until_mixed

# Recipes whose gates sit in the blocks run every layout; the agent and gater recipes walk a ResNet's stages.
BLOCK_GATED = ["fbs", "batch_shaping", "stochastic_neurons", "dynamic_channel_exec", "instance_sparsity"]
RESNET_WALKERS = ["gaternet", "rnp", "runtime_routing"]
CASES = [(r, a) for r in BLOCK_GATED for a in ("bottleneck", "inverted")] + [(r, "bottleneck") for r in RESNET_WALKERS]


def _trained_like(base: torch.nn.Module) -> torch.nn.Module:
    """Batch-norm statistics and affine parameters far from the defaults, as a trained network has."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.6 + 0.6)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return base.eval()


@functools.cache
def _base(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "bottleneck":
        return _trained_like(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10))
    return _trained_like(torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25))


def _pair(recipe: str, arch: str, **config) -> tuple[torch.nn.Module, dynnet.DynamicModel]:
    base = _base(arch)
    torch.manual_seed(1)
    return base, dynnet.convert(copy.deepcopy(base), recipe, **config)


def _x(n: int = 6) -> torch.Tensor:
    return diverse_inputs(n, (3, 32, 32))


@pytest.mark.parametrize(("recipe", "arch"), CASES)
def test_open_gates_reproduce_the_base(recipe: str, arch: str) -> None:
    base, model = _pair(recipe, arch, budget=1.0)
    x = _x(2)
    with torch.no_grad():
        reference = base(x)
        for mode in ("masked", "sparse"):
            dynnet.set_mode(model.eval(), mode)
            torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("recipe", "arch"), CASES)
def test_sparse_equals_masked_and_executes_the_counted_macs(recipe: str, arch: str) -> None:
    base, model = _pair(recipe, arch)
    x = _x(8)
    scramble_until_mixed(model, x, across_inputs=RECIPES.get(recipe).input_dependent)
    model.eval()
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    dynnet.set_mode(model, "dense")
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as counter:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ts.macs(), tm.macs())
    assert ts.executed_macs().sum().item() == pytest.approx(counter.total, abs=0.5)
    assert (ts.macs() < ts.dense_macs()).any(), "scrambled gates should save MACs for some input"
    for i in range(2):  # batch 1 takes other paths
        with torch.no_grad(), dynnet.trace() as t1, MacCounter() as c1:
            torch.testing.assert_close(model(x[i : i + 1]), masked[i : i + 1], rtol=1e-4, atol=1e-4)
        assert t1.executed_macs().item() == pytest.approx(c1.total, abs=0.5)
        assert t1.macs().item() == pytest.approx(tm.macs()[i].item(), abs=0.5)


GRADIENT_CASES = [("fbs", "bottleneck"), ("batch_shaping", "inverted"), ("rnp", "bottleneck")]


@pytest.mark.parametrize(("recipe", "arch"), GRADIENT_CASES)
def test_gradients_reach_the_gates_and_copies_compute_the_same(recipe: str, arch: str) -> None:
    _, model = _pair(recipe, arch)
    x = _x(4)
    model.train()
    with dynnet.trace() as t:
        logits = model(x)
    model.compute_loss(logits, torch.arange(4), t).total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    scramble_until_mixed(model, x, across_inputs=RECIPES.get(recipe).input_dependent)
    dynnet.sparse(model.eval())
    with torch.no_grad():
        expected = model(x)
        other = _pair(recipe, arch)[1]
        other.load_state_dict(copy.deepcopy(model.state_dict()), strict=True)
        dynnet.sparse(other.eval())
        for how, copied in {"state_dict": other, "pickle": pickle.loads(pickle.dumps(model)),
                            "deepcopy": copy.deepcopy(model)}.items():  # fmt: skip
            torch.testing.assert_close(copied(x), expected, rtol=0, atol=0, msg=how)


def test_the_gated_width_is_the_bottleneck_middle_and_the_expanded_channels() -> None:
    _, resnet = _pair("fbs", "bottleneck")
    _, mobilenet = _pair("fbs", "inverted")
    blocks = [b for b in resnet.modules() if isinstance(b, ChannelGatedBlock)]
    assert {b.layout.kind for b in blocks} == {"bottleneck"}
    assert [b.channels for b in blocks] == [64, 128, 256, 512]  # conv1's outputs = conv2's inputs
    inverted = [b for b in mobilenet.modules() if isinstance(b, ChannelGatedBlock)]
    assert inverted and {b.layout.kind for b in inverted} == {"inverted"}
    assert all(b.channels == b.get_submodule(b.layout.head[0].conv).out_channels for b in inverted)  # expanded


def test_fbs_below_budget_one_keeps_its_budget_on_bottlenecks() -> None:
    _, model = _pair("fbs", "bottleneck", budget=0.5)
    with torch.no_grad(), dynnet.trace() as t:
        dynnet.sparse(model.eval())(_x(4))
    assert float(t.macs().mean()) / t.dense_macs() == pytest.approx(0.5, abs=0.02)  # conv3 counted as fixed


@pytest.mark.parametrize(
    ("recipe", "arch", "words"),
    [
        ("channel_gating", "bottleneck", "basic residual"),
        ("rnp", "inverted", "ResNet-style"),
        ("gaternet", "inverted", "ResNet-style"),
    ],
)
def test_recipes_that_cannot_apply_say_what_they_support(recipe: str, arch: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        dynnet.convert(copy.deepcopy(_base(arch)), recipe)


def test_grouped_bottlenecks_are_refused_in_one_line() -> None:
    torch.manual_seed(0)
    resnext = ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=16, num_classes=10)
    with pytest.raises(ValueError, match=r"conv2 is grouped \(groups=4"):
        dynnet.convert(resnext, "fbs")


@pytest.mark.parametrize("squeeze", [False, True])
@pytest.mark.parametrize("expand", [True, False])
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sliced_expanded_matches_the_dense_reference(expand: bool, binary: bool, strategy: str, squeeze: bool) -> None:
    g = torch.Generator().manual_seed(0)
    n, cin, c, cout = 5, 6, 12 if expand else 6, 7
    x = torch.randn(n, cin, 9, 9, generator=g)
    convs = ExpandedConvs(
        torch.randn(c, cin, 1, 1, generator=g) if expand else None,
        torch.randn(c, generator=g) if expand else None,
        torch.randn(c, 1, 3, 3, generator=g),
        torch.randn(c, generator=g),
        torch.randn(cout, c, 1, 1, generator=g),
        torch.randn(cout, generator=g),
        ConvSpec((1, 1), (0, 0), (1, 1)) if expand else None,
        ConvSpec((2, 2), (1, 1), (1, 1)),
        ConvSpec((1, 1), (0, 0), (1, 1)),
    )
    keep = torch.rand(n, c, generator=g) < 0.5
    keep[0] = False  # a sample with nothing kept: the projection's bias alone
    scale = keep * (1.0 if binary else torch.rand(n, c, generator=g) + 0.5)
    act = torch.nn.ReLU6()
    r = 3  # squeezed channels
    se = None
    if squeeze:  # MobileNetV3's: ReLU between, hard sigmoid gate
        w1, b1 = torch.randn(r, c, generator=g), torch.randn(r, generator=g)
        se = SqueezeExcite(w1, b1, torch.randn(c, r, generator=g), torch.randn(c, generator=g), torch.relu,
                           torch.nn.Hardsigmoid())  # fmt: skip
    with MacCounter() as counter:
        y, executed = sliced_expanded(x, convs, scale, act, binary=binary, strategy=strategy, se=se)
    reference = expanded_reference(x, convs, scale, act, se)
    if squeeze:  # the excitation really rescales the kept channels (else the check below says nothing about it)
        assert not torch.allclose(reference, expanded_reference(x, convs, scale, act), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    per_channel = (cin if expand else 0) * 81 + 9 * 25 + cout * 25  # expansion, depthwise, projection of one channel
    per_channel += 2 * r if squeeze else 0  # the excitation's reduction column and expansion row
    assert counter.total == pytest.approx(float(executed.sum()) * per_channel)
    if strategy in ("groups", "per_sample"):
        assert torch.equal(executed, keep.sum(1).double())


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sliced_mlp_matches_the_dense_reference(binary: bool, strategy: str) -> None:
    g = torch.Generator().manual_seed(0)
    n, p, c, d, cout = 5, 7, 6, 12, 6
    t = torch.randn(n, p, c, generator=g)
    w1, b1 = torch.randn(d, c, generator=g), torch.randn(d, generator=g)
    w2, b2 = torch.randn(cout, d, generator=g), torch.randn(cout, generator=g)
    keep = torch.rand(n, d, generator=g) < 0.5
    keep[0] = False  # a sample with nothing kept: the second layer's bias alone
    keep[1] = True  # and one with everything
    assert 0 < keep[2:].float().mean() < 1  # precondition: the others keep some of their channels
    scale = keep * (1.0 if binary else torch.rand(n, d, generator=g) + 0.5)
    act = torch.nn.GELU()
    with MacCounter() as counter:
        y, executed = sliced_mlp(t, w1, b1, w2, b2, scale, act, binary=binary, strategy=strategy)
    torch.testing.assert_close(y, mlp_reference(t, w1, b1, w2, b2, scale, act), rtol=1e-5, atol=1e-5)
    assert counter.total == pytest.approx(float(executed.sum()) * p * (c + cout))  # both layers, per kept channel
    if strategy in ("groups", "per_sample"):
        assert torch.equal(executed, keep.sum(1).double())
