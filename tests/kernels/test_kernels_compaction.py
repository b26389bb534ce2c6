"""Batch compaction: equal to the masked sum for every keep pattern, in both memory layouts, at batch 1 too."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynnet.kernels import compact_add, compact_apply
from dynnet.kernels.compaction import index_add_rows, index_select_rows

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _body() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.ReLU()).eval()


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 6),
    bits=st.integers(0, 2**6 - 1),
    channels_last=st.booleans(),
    as_float=st.booleans(),
)
def test_compact_add_equals_the_masked_sum(n: int, bits: int, channels_last: bool, as_float: bool) -> None:
    fmt = LAYOUTS[channels_last]
    body = _body().to(memory_format=fmt)
    x = torch.randn(n, 3, 5, 4).contiguous(memory_format=fmt)
    base = torch.randn(n, 3, 5, 4).contiguous(memory_format=fmt)
    keep = torch.tensor([(bits >> i) & 1 for i in range(n)], dtype=torch.bool)
    with torch.no_grad():
        expected = base + keep.view(-1, 1, 1, 1) * body(x)
        out = compact_add(body, x, keep.float() if as_float else keep, base)
    torch.testing.assert_close(out, expected)
    if channels_last and 1 < int(keep.sum()) < n:
        assert out.is_contiguous(memory_format=torch.channels_last), "compaction must keep the layout"


def test_compact_add_runs_the_body_on_kept_samples_only() -> None:
    seen: list[int] = []

    def body(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.shape[0])
        return z * 2

    x = torch.randn(5, 2, 3, 3)
    compact_add(body, x, torch.tensor([1, 0, 1, 0, 0]), x)
    compact_add(body, x, torch.zeros(5), x)
    compact_add(body, x[:1], torch.zeros(1), x[:1])
    compact_add(body, x, torch.ones(5), x)
    assert seen == [2, 5]


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_row_gather_and_scatter_keep_the_layout(fmt: torch.memory_format) -> None:
    x = torch.randn(6, 4, 3, 5).contiguous(memory_format=fmt)
    idx = torch.tensor([4, 0, 2])
    g = index_select_rows(x, idx)
    torch.testing.assert_close(g, x.index_select(0, idx))
    assert g.is_contiguous(memory_format=fmt)
    src = torch.randn(3, 4, 3, 5)  # NCHW source into a base of either layout
    out = index_add_rows(x, idx, src)
    torch.testing.assert_close(out, x.index_add(0, idx, src))
    assert out.is_contiguous(memory_format=fmt)
    assert torch.equal(compact_apply(lambda z: z, x, idx), x.index_select(0, idx))
