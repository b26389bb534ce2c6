"""Converting real model-zoo networks: gates start open, keys are kept, sparse equals masked."""

import copy

import pytest
import torch
import torchvision

import dynnet
from dynnet.convert import residual_blocks
from dynnet.testing import scramble_gates

timm = pytest.importorskip("timm")

ZOO = {
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 8),
    "tv_resnet50": (lambda: torchvision.models.resnet50(num_classes=10), 16),
    "tv_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 10),
    "timm_resnet18": (lambda: timm.create_model("resnet18", num_classes=10), 8),
    "timm_resnet50": (lambda: timm.create_model("resnet50", num_classes=10), 16),
}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_conversion(name: str, x: torch.Tensor) -> None:
    build, n_blocks = ZOO[name]
    torch.manual_seed(0)
    base = build().eval()
    assert len(residual_blocks(base)) == n_blocks
    model = dynnet.convert(base, "convnet_aig", budget=0.5).eval()
    # a copy by default: the user's model is untouched
    assert not any(isinstance(m, dynnet.DynamicBlock) for m in base.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))
        # every original key is kept; only gate parameters are new
        base_keys = set(base.state_dict())
        net_keys = set(model.net.state_dict())
        assert base_keys <= net_keys
        assert all(".gate." in k for k in net_keys - base_keys)
        scramble_gates(model, seed=1)
        masked = model(x)
        dynnet.sparse(model)
        torch.testing.assert_close(model(x), masked, rtol=1e-4, atol=1e-4)


def test_user_weights_load_into_converted_model(x: torch.Tensor) -> None:
    src = torchvision.models.resnet18(num_classes=10).eval()
    model = dynnet.convert(torchvision.models.resnet18(num_classes=10), "convnet_aig").eval()
    model.load_base_state_dict(copy.deepcopy(src.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))
    with pytest.raises(KeyError, match="missing"):
        model.load_base_state_dict({k: v for k, v in src.state_dict().items() if "layer4" not in k})


def test_targets_by_name_and_predicate() -> None:
    base = dynnet.create_model("cifar_resnet20")
    only = dynnet.convert(base, "convnet_aig", targets=["layer2.0", "layer3.1"])
    assert [n for n, _ in only.blocks()] == ["net.layer2.0", "net.layer3.1"]
    pred = dynnet.convert(base, "convnet_aig", targets=lambda n, m: n.startswith("layer1"))
    assert len(pred.blocks()) == 3
    with pytest.raises(ValueError, match="not a submodule"):
        dynnet.convert(base, "convnet_aig", targets=["layer9.0"])
    with pytest.raises(ValueError, match="not a residual block"):
        dynnet.convert(base, "convnet_aig", targets=["layer1.0.conv1"])
    with pytest.raises(ValueError, match="no residual blocks"):
        dynnet.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), "convnet_aig")


def test_mobilenet_blocks_without_residual_are_left_alone() -> None:
    base = torchvision.models.mobilenet_v2(num_classes=10)
    residual = [n for n, m in base.named_modules() if getattr(m, "use_res_connect", False)]
    assert [n for n, _, _ in residual_blocks(base)] == residual
