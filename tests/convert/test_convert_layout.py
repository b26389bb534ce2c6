"""Network layouts: stem → blocks → head reproduces the network, and a conversion keeps its base's stages."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.convert import network_layout
from dynnet.testing.matrix import build_model


@pytest.mark.parametrize(
    "name", ["torchvision/mobilenet_v2", "torchvision/convnext_tiny", "torchvision/regnet_y_400mf", "timm/resnet18"]
)
def test_the_layout_runs_the_network_and_survives_conversion(name: str) -> None:
    if name.startswith("timm/"):
        pytest.importorskip("timm")
    base = build_model(name)
    layout = network_layout(base)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = layout.stem(base, x)
        for _, block in layout.blocks(base):
            h = block(h)
        torch.testing.assert_close(layout.head(base, h), base(x))
    model = dynnet.convert(base, "convnet_aig")  # wraps the residual blocks in place
    assert network_layout(model.net).stages == layout.stages


def test_an_unknown_network_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"^skipnet runs a network as stem → blocks → head and does not know Seq"):
        network_layout(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), needed_by="skipnet")
