"""timm's ResNet blocks have spatial chains: DynConv converts a timm ResNet-18 and really skips in sparse mode."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.blocks import spatial_chain
from dynnet.testing import assert_decisions_mixed, diverse_inputs, scramble_until_mixed

timm = pytest.importorskip("timm")


def test_dynconv_on_a_timm_resnet18_matches_masked_and_executes_what_it_counts() -> None:
    torch.manual_seed(0)
    base = timm.create_model("resnet18", num_classes=10, pretrained=False).eval()
    blocks = [m for m in base.modules() if type(m).__name__ == "BasicBlock"]
    assert blocks and all(spatial_chain(b) is not None for b in blocks)
    model = dynnet.convert(base, "dynconv", budget=0.5).eval()
    x = diverse_inputs(4, (3, 64, 64))
    scramble_until_mixed(model, x)
    with torch.no_grad():
        dynnet.set_mode(model, "masked")
        with dynnet.trace() as masked:
            expected = model(x)
        assert_decisions_mixed(masked, "dynconv")
        dynnet.set_mode(model, "sparse")
        with dynnet.trace() as sparse:
            got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sparse.macs(), masked.macs())
    assert (sparse.executed_macs() <= sparse.dense_macs()).all() and sparse.macs().mean() < 0.9 * sparse.dense_macs()


def test_a_timm_block_that_is_not_a_plain_chain_has_none() -> None:
    block = timm.create_model("resnet18", num_classes=10, pretrained=False).layer1[0]
    assert spatial_chain(block) is not None
    block.se = torch.nn.Identity()  # squeeze-excitation between the branch and the sum: not a conv chain
    assert spatial_chain(block) is None
