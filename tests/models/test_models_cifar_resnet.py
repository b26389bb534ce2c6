import pytest
import torch

import dynnet
from dynnet.models import CifarResNet


@pytest.mark.parametrize("depth", [8, 20, 32, 56, 110])
def test_depth_and_block_count(depth: int) -> None:
    model = dynnet.create_model(f"cifar_resnet{depth}", num_classes=7, in_channels=1, width=0.25)
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 3 * (depth - 2) // 6
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == depth  # 3x3 convs + the final linear layer
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_width_multiplier_scales_channels_and_macs() -> None:
    x = torch.randn(1, 3, 32, 32)
    full = dynnet.count_macs(CifarResNet(20).eval(), x).total
    half = dynnet.count_macs(CifarResNet(20, width=0.5).eval(), x).total
    assert CifarResNet(20, width=0.5).fc.in_features == 32
    assert 0.2 * full < half < 0.3 * full  # MACs scale ~ width^2


def test_resnet20_macs_match_the_known_count() -> None:
    # ResNet-20 on 32x32 with projection shortcuts: 40.55 M MACs (option A: 40.55M minus the 1x1 convs).
    model = CifarResNet(20).eval()
    macs = dynnet.count_macs(model, torch.randn(1, 3, 32, 32)).total
    convs3 = (
        16 * 3 * 9 * 1024
        + 6 * 16 * 16 * 9 * 1024
        + (16 * 32 + 5 * 32 * 32) * 9 * 256
        + (32 * 64 + 5 * 64 * 64) * 9 * 64
    )
    shortcuts = 16 * 32 * 256 + 32 * 64 * 64
    assert macs == convs3 + shortcuts + 64 * 10


@pytest.mark.parametrize("bad", [7, 9, 4])
def test_bad_depth(bad: int) -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(bad)
