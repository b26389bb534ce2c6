"""The squeeze mask unit (DynConv's mask unit, SACT's halting unit): its compiled inference pass equals its layers."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from dynnet.macs import MacCounter
from dynnet.methods.spatial.gates import SqueezeMaskUnit
from dynnet.testing.engines import kernel_engine

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(c: int, stride: int, seed: int) -> SqueezeMaskUnit:
    torch.manual_seed(seed)
    unit = SqueezeMaskUnit(c, stride).eval()
    with torch.no_grad():  # weights of a trained unit, not the near-zero initial ones
        unit.conv.weight.normal_()
        unit.fc.weight.normal_()
        unit.conv.bias.normal_()
        unit.fc.bias.normal_()
    return unit


def _layers(unit: SqueezeMaskUnit, x: torch.Tensor) -> torch.Tensor:
    return unit.conv(x).squeeze(1) + unit.fc(unit.pool(x).flatten(1)).view(-1, 1, 1)


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 40),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    stride=st.integers(1, 3),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_compiled_unit_equals_its_layers(n, c, h, w, stride, channels_last, seed) -> None:
    """Any batch, channel count, size (the output's column blocks of 16, 32, 64 and their remainders), stride
    (column phases) and memory format."""
    unit = _unit(c, stride, seed % 1000)
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with kernel_engine("native"), torch.no_grad():
        got = unit._compiled(x)
        ref = _layers(unit, x)
    assert got is not None
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_compiled_unit_steps_aside() -> None:
    """Gradients, a MAC counter (which then counts the layers' MACs), hooks and the torch engine run the layers."""
    unit = _unit(8, 2, 0)
    x = torch.randn(2, 8, 9, 9)
    with kernel_engine("native"):
        assert unit(x).requires_grad  # gradients on: the layers
        with torch.no_grad():
            assert unit._compiled(x) is not None
            with MacCounter() as counter:
                unit(x)
            assert counter.total == 2 * (5 * 5 * 8 * 9 + 8)
            seen = []
            handle = unit.conv.register_forward_hook(lambda *a: seen.append(1))
            unit(x)
            handle.remove()
            assert seen
    with kernel_engine("torch"), torch.no_grad():
        assert unit._compiled(x) is None


def test_squeeze_logits_rejects_bad_operands() -> None:
    from dynnet.kernels import native

    with kernel_engine("native"):
        ext = native.load()
        x, w, b = torch.randn(1, 4, 5, 5), torch.randn(1, 4, 3, 3), torch.randn(1)
        fw, fb = torch.randn(1, 4), torch.randn(1)
        ext.squeeze_logits(x, w, b, 1, 1, fw, fb)
        with pytest.raises(RuntimeError, match=r"w must be a float32 Tensor\[1, 4, k, k\]"):
            ext.squeeze_logits(x, torch.randn(2, 4, 3, 3), b, 1, 1, fw, fb)
        with pytest.raises(RuntimeError, match="fw float32 with 4"):
            ext.squeeze_logits(x, w, b, 1, 1, torch.randn(1, 3), fb)
        with pytest.raises(RuntimeError, match="does not fit"):
            ext.squeeze_logits(torch.randn(1, 4, 1, 1), w, b, 1, 0, fw, fb)
        with pytest.raises(RuntimeError, match="x must be a float32 CPU"):
            ext.squeeze_logits(x.double(), w, b, 1, 1, fw, fb)
