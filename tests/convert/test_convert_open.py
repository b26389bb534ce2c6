"""Open means open: a fresh conversion of a Bottleneck ResNet with trained-like BatchNorm statistics reproduces it."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import dynnet


@pytest.fixture(scope="module")
def trained_like_resnet50() -> torch.nn.Module:
    torch.manual_seed(0)
    base = torchvision.models.resnet50(num_classes=10).eval()
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # statistics far from the defaults, as a trained network has
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.6, 1.2)  # features grow through 16 blocks (logits ~200): tiny gate weights
                # of 1e-3 closed 11 % of the MACs here and moved the logits by 44-58 % (SBNet, DynConv)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
    return base


@pytest.mark.parametrize("recipe", ["convnet_aig", "sbnet", "dynconv"])
def test_a_fresh_conversion_reproduces_a_trained_like_bottleneck_resnet(trained_like_resnet50, recipe: str) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = trained_like_resnet50(x)
        model = dynnet.convert(copy.deepcopy(trained_like_resnet50), recipe, budget=0.5).eval()
        for mode in ("masked", "sparse"):
            dynnet.set_mode(model, mode)
            with dynnet.trace() as t:
                out = model(x)
            torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
            assert float(t.macs().min()) >= t.dense_macs()  # nothing skipped yet (gates cost a little more)
