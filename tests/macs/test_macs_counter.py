"""Tests of the aten-level MAC counter: analytic oracles, parity with flop_counter and fvcore, attribution."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from dynnet.macs.counter import MacCounter, counting_suspended, suspend_counting
from dynnet.macs.report import format_macs, format_module_table
from dynnet.macs.rules import MAC_RULES, register_mac_rule

aten = torch.ops.aten


def count(fn: Callable[[], object], model: nn.Module | None = None) -> MacCounter:
    with torch.no_grad(), MacCounter(model) as counter:
        fn()
    return counter


def conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# --- 1. analytic counts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("c_in", "c_out", "kernel", "stride", "padding", "dilation", "groups"),
    [
        (3, 8, 3, 1, 1, 1, 1),
        (4, 6, 5, 2, 2, 1, 2),
        (8, 8, 3, 2, 1, 1, 8),  # depthwise
        (6, 4, 3, 1, 2, 2, 1),  # dilated
        (5, 7, 1, 1, 0, 1, 1),  # pointwise
    ],
)
def test_conv2d_matches_formula(
    c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int, groups: int
) -> None:
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias=True)
    x = torch.randn(2, c_in, 13, 11)
    h, w = (conv_out(s, kernel, stride, padding, dilation) for s in (13, 11))
    expected = 2 * c_out * h * w * (c_in // groups) * kernel * kernel
    counter = count(lambda: conv(x))
    assert counter.total == expected
    assert counter.by_op() == {"aten.convolution": expected}
    assert counter.uncounted_ops() == {}


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    size=st.tuples(st.integers(8, 12), st.integers(8, 12)),
    transposed=st.booleans(),
)
def test_conv2d_property(
    batch: int,
    groups: int,
    in_per_group: int,
    out_per_group: int,
    kernel: tuple[int, int],
    stride: int,
    padding: int,
    dilation: int,
    size: tuple[int, int],
    transposed: bool,
) -> None:
    c_in, c_out = groups * in_per_group, groups * out_per_group
    args = (c_in, c_out, kernel, stride, padding)
    conv_type = nn.ConvTranspose2d if transposed else nn.Conv2d
    conv = conv_type(*args, dilation=dilation, groups=groups)
    x = torch.randn(batch, c_in, *size)
    # A transposed conv scatters every input position through the kernel; a regular one gathers per output.
    spatial = (
        size if transposed else [conv_out(s, k, stride, padding, dilation) for s, k in zip(size, kernel, strict=True)]
    )
    expected = batch * math.prod(spatial) * c_out * in_per_group * kernel[0] * kernel[1]
    assert count(lambda: conv(x)).total == expected


def test_conv_transpose2d_matches_formula_and_flop_counter() -> None:
    conv = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
    x = torch.randn(2, 6, 5, 7)
    expected = 2 * 5 * 7 * 6 * (4 // 2) * 3 * 3
    assert count(lambda: conv(x)).total == expected
    with torch.no_grad(), FlopCounterMode(display=False) as reference:
        conv(x)
    assert reference.get_total_flops() == 2 * expected


def test_conv3d_and_conv1d() -> None:
    conv3 = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1))
    conv1 = nn.Conv1d(3, 5, 3, stride=2, bias=False)
    assert count(lambda: conv3(torch.randn(1, 2, 4, 6, 6))).total == 4 * 6 * 6 * 4 * 2 * 9
    assert count(lambda: conv1(torch.randn(2, 3, 9))).total == 2 * 4 * 5 * 3 * 3


@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_batch_dims(bias: bool) -> None:
    linear = nn.Linear(16, 32, bias=bias)
    assert count(lambda: linear(torch.randn(2, 5, 7, 16))).total == 2 * 5 * 7 * 16 * 32
    assert count(lambda: linear(torch.randn(16))).total == 16 * 32


def test_matrix_products() -> None:
    a, b = torch.randn(3, 4, 5), torch.randn(3, 5, 6)
    assert count(lambda: torch.bmm(a, b)).total == 3 * 4 * 5 * 6
    assert count(lambda: torch.baddbmm(torch.randn(3, 4, 6), a, b)).total == 3 * 4 * 5 * 6
    assert count(lambda: a @ b).total == 3 * 4 * 5 * 6
    assert count(lambda: a @ b[0]).total == 3 * 4 * 5 * 6
    assert count(lambda: torch.einsum("bij,bjk->bik", a, b)).total == 3 * 4 * 5 * 6
    assert count(lambda: torch.mm(a[0], b[0])).total == 4 * 5 * 6
    assert count(lambda: torch.addmm(torch.randn(6), a[0], b[0])).total == 4 * 5 * 6
    assert count(lambda: a[0] @ b[0, :, 0]).total == 4 * 5  # mv
    assert count(lambda: a[0, 0] @ b[0, :, 0]).total == 5  # dot


def test_scaled_dot_product_attention() -> None:
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    counter = count(lambda: F.scaled_dot_product_attention(q, k, v))
    assert counter.total == 2 * 3 * 5 * 7 * (8 + 4)
    assert counter.uncounted_ops() == {}


def test_transformer_fast_path_matches_slow_path() -> None:
    d_model, ffn, length, batch = 32, 48, 7, 3
    layer = nn.TransformerEncoderLayer(d_model, 4, dim_feedforward=ffn, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    mha = nn.MultiheadAttention(d_model, 4, batch_first=True).eval()
    x = torch.randn(batch, length, d_model)
    per_layer = batch * (length * (4 * d_model**2 + 2 * d_model * ffn) + 2 * d_model * length**2)
    per_mha = batch * (length * 4 * d_model**2 + 2 * d_model * length**2)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    try:
        for enabled in (True, False):
            torch.backends.mha.set_fastpath_enabled(enabled)
            encoder_counter, mha_counter = count(lambda: encoder(x)), count(lambda: mha(x, x, x))
            assert encoder_counter.total == 2 * per_layer, enabled
            assert mha_counter.total == per_mha, enabled
            assert encoder_counter.uncounted_ops() == mha_counter.uncounted_ops() == {}
        assert "aten._transformer_encoder_layer_fwd" not in encoder_counter.by_op()  # slow path ran last
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


# --- 2./3. static models against flop_counter and fvcore ------------------------------------------------------


def _timm(name: str, **kwargs: object) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, **kwargs)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "resnet50": lambda: torchvision.models.resnet50(weights=None),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(weights=None),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(weights=None),
    "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(weights=None),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(weights=None),
    "timm_resnet18": lambda: _timm("resnet18"),
    "timm_efficientnet_b0": lambda: _timm("efficientnet_b0"),
}
INPUT = (1, 3, 64, 64)


@functools.cache
def built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().eval()


@functools.cache
def counted(name: str) -> MacCounter:
    model = built(name)
    return count(lambda: model(torch.randn(INPUT)), model)


def fvcore_macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """fvcore's per-operator counts (1 per MAC) of the ops MacCounter counts."""
    fvcore_nn = pytest.importorskip("fvcore.nn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit tracer warnings
        analysis = fvcore_nn.FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_operator = analysis.by_operator()
    return {
        op: n for op, n in by_operator.items() if op in {"conv", "linear", "addmm", "matmul", "mm", "bmm", "einsum"}
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_static_model_matches_flop_counter(name: str) -> None:
    model = built(name)
    with torch.no_grad(), FlopCounterMode(display=False) as reference:
        model(torch.randn(INPUT))
    flops = reference.get_total_flops()
    assert flops % 2 == 0
    assert counted(name).total == flops // 2
    assert counted(name).uncounted_ops() == {}


@pytest.mark.parametrize("name", list(MODELS))
def test_static_model_matches_fvcore(name: str) -> None:
    assert counted(name).total == sum(fvcore_macs(built(name), torch.randn(INPUT)).values())


def test_vit_counts_attention_that_references_miss() -> None:
    # On CPU, F.scaled_dot_product_attention runs aten._scaled_dot_product_flash_attention_for_cpu, which
    # flop_counter has no formula for and fvcore (aten::scaled_dot_product_attention) does not handle.
    model = _timm("vit_tiny_patch16_224", img_size=64).eval()
    x = torch.randn(INPUT)
    counter = count(lambda: model(x), model)
    tokens, heads, head_dim, depth = (64 // 16) ** 2 + 1, 3, 64, 12
    attention = counter.by_op()["aten._scaled_dot_product_flash_attention_for_cpu"]
    assert attention == depth * heads * tokens * tokens * 2 * head_dim
    cpu_sdpa = aten._scaled_dot_product_flash_attention_for_cpu
    mapping = {cpu_sdpa: lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as reference:
        model(x)
    assert counter.total == reference.get_total_flops() // 2
    assert counter.total - attention == sum(fvcore_macs(model, x).values())


# --- 4. per-module attribution ----------------------------------------------------------------------------------


def test_by_module_is_hierarchical_and_exact() -> None:
    counter = counted("resnet18")
    by_module = counter.by_module()
    assert next(iter(by_module)) == ""
    assert by_module[""] == counter.total == sum(counter.by_op().values())
    for parent, macs in by_module.items():
        prefix = f"{parent}." if parent else ""
        children = [n for n in by_module if n.startswith(prefix) and n != parent and "." not in n[len(prefix) :]]
        assert sum(by_module[c] for c in children) <= macs
    assert sum(by_module[c] for c in ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]) == counter.total
    assert by_module["conv1"] == 64 * 32 * 32 * 3 * 7 * 7
    assert by_module["layer1.0.conv1"] == 64 * 16 * 16 * 64 * 3 * 3
    assert by_module["bn1"] == by_module["relu"] == 0
    assert counter.by_module().keys() <= {name for name, _ in built("resnet18").named_modules()}


def test_by_module_without_model_and_outside_ops() -> None:
    linear = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    assert count(lambda: linear(x)).by_module() == {"": 24}

    def run() -> None:
        linear(x)
        x @ torch.randn(4, 5)  # outside the model: root only

    assert count(run, linear).by_module() == {"": 24 + 40}


def test_train_mode_and_gradients_unchanged() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with MacCounter(model) as counter:
        model(x).sum().backward()  # backward ops are not inference cost
    assert counter.total == 2 * (4 * 6 * 6 * 3 * 9) + 2 * 144 * 2
    for p, grad in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, grad)


# --- 5. suspension and nesting ----------------------------------------------------------------------------------


def test_suspend_counting_and_nesting() -> None:
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    assert not counting_suspended()
    with torch.no_grad(), MacCounter() as outer:
        a @ b
        with suspend_counting():
            assert counting_suspended()
            a @ b  # hidden from `outer`
            with MacCounter() as probe:  # entered inside the suspension: counts normally
                a @ b
            with suspend_counting():
                a @ b  # hidden from `probe` too
        with MacCounter() as inner:
            a @ b
    assert not counting_suspended()
    assert (outer.total, probe.total, inner.total) == (2 * 120, 120, 120)


def test_reentering_a_counter_restarts_it() -> None:
    linear = nn.Linear(4, 3)
    counter = MacCounter(linear)
    with torch.no_grad():
        for _ in range(2):
            with counter:
                linear(torch.randn(2, 4))
            assert counter.total == 24


# --- 6. uncounted ops and rule registration ---------------------------------------------------------------------


@torch.library.custom_op("dynnet_test::scaled_outer", mutates_args=())
def scaled_outer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.outer(x, y) * 2


def test_uncounted_ops_reports_ops_without_rule() -> None:
    x, y = torch.randn(5), torch.randn(3)
    counter = count(lambda: (scaled_outer(x, y), torch.fft.rfft2(torch.randn(4, 4)), F.relu(x)))
    assert counter.uncounted_ops() == {"dynnet_test.scaled_outer": 1, "aten._fft_r2c": 1}
    assert counter.total == 0

    op = torch.ops.dynnet_test.scaled_outer
    register_mac_rule(op)(lambda args, kwargs, out: out.numel())
    try:
        counter = count(lambda: scaled_outer(x, y))
        assert (counter.total, counter.uncounted_ops()) == (15, {})
        with pytest.raises(ValueError, match="already registered"):
            register_mac_rule(op)(lambda args, kwargs, out: 0)
        register_mac_rule(op, override=True)(lambda args, kwargs, out: 1)
        assert count(lambda: scaled_outer(x, y)).total == 1
    finally:
        del MAC_RULES[op]


def test_register_mac_rule_validates_ops() -> None:
    with pytest.raises(TypeError, match="op packet"):
        register_mac_rule(aten.mm.default)
    with pytest.raises(ValueError, match="at least one op"):
        register_mac_rule()


# --- report -----------------------------------------------------------------------------------------------------


def test_format_macs() -> None:
    assert format_macs(1_814_073_344) == "1.81 GMACs"
    assert format_macs(512_000) == "512.00 KMACs"
    assert format_macs(0) == "0 MACs"


def test_format_module_table() -> None:
    by_module = {"": 1000, "layer1": 600, "layer1.0": 600, "layer1.0.conv": 600, "fc": 400}
    table = format_module_table(by_module, 1000, max_depth=2, per_sample_divisor=2)
    lines = table.splitlines()
    assert lines[0].split() == ["Module", "MACs", "%", "total"]
    assert [line.split()[0] for line in lines[1:]] == ["(model)", "layer1", "layer1.0", "fc"]
    assert lines[1].split()[1:] == ["500", "MACs", "100.00%"]
    assert lines[3].startswith("    layer1.0") and lines[3].endswith("60.00%")
    with pytest.raises(ValueError, match="per_sample_divisor"):
        format_module_table(by_module, 1000, per_sample_divisor=0)
