"""Bad input gets a clear error naming the problem."""

import pytest
import torch

import dynnet
from dynnet.core import UnknownNameError


@pytest.fixture(scope="module")
def model() -> dynnet.DynamicModel:
    return dynnet.create_model("cifar_resnet8", recipe="convnet_aig", in_channels=1, width=0.25).eval()


def test_wrong_rank(model: dynnet.DynamicModel) -> None:
    with pytest.raises(ValueError, match=r"Tensor\[N, C, H, W\].*got shape \(1, 28, 28\)"):
        model(torch.randn(1, 28, 28))


def test_wrong_channels(model: dynnet.DynamicModel) -> None:
    with pytest.raises(ValueError, match="expects 1 input channels, got 3"):
        model(torch.randn(2, 3, 28, 28))


def test_integer_images(model: dynnet.DynamicModel) -> None:
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input(model: dynnet.DynamicModel, bad: float) -> None:
    x = torch.randn(2, 1, 28, 28)
    x[1, 0, 3, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(x)


def test_empty_batch_and_not_a_tensor(model: dynnet.DynamicModel) -> None:
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.randn(0, 1, 28, 28))
    with pytest.raises(TypeError, match="Tensor"):
        model([[0.0]])


def test_unknown_recipe_and_model() -> None:
    with pytest.raises(UnknownNameError, match="unknown recipe 'nope'.*convnet_aig"):
        dynnet.create_model("cifar_resnet8", recipe="nope")
    with pytest.raises(UnknownNameError, match="unknown model 'resnet_nope'"):
        dynnet.create_model("resnet_nope")
    with pytest.raises(UnknownNameError, match="unknown timm model"):
        dynnet.create_model("timm/nope_net")


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.01, float("nan")])
def test_budget_outside_unit_interval(budget: float) -> None:
    with pytest.raises(ValueError, match=r"budget must be a fraction in \(0, 1\]"):
        dynnet.create_model("cifar_resnet8", recipe="convnet_aig", budget=budget)


def test_unknown_recipe_setting() -> None:
    with pytest.raises(TypeError, match="has no setting"):
        dynnet.create_model("cifar_resnet8", recipe="convnet_aig", temperature=3)


def test_bad_mode_and_tau(model: dynnet.DynamicModel) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        dynnet.set_mode(model, "fast")
    with pytest.raises(ValueError, match="tau must be positive"):
        dynnet.set_tau(model, 0.0)


def test_convert_needs_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        dynnet.convert("resnet18", "convnet_aig")
