"""Every layer-skip recipe honours ``budget`` as a MAC fraction on the network the benchmarks use (a ResNet-20 on
Fashion-MNIST-shaped input): its declared knob (a logit offset on every gate or on the policy) calibrates it on some
images, and the MAC fraction holds on others."""

import pytest
import torch

import dynnet
from dynnet.core import RECIPES
from dynnet.testing import diverse_inputs, scramble_until_mixed

RECIPES_OF_FAMILY = [r for r in dynnet.list_recipes() if RECIPES.get(r).family == "layer_skip"]
SHAPE = (1, 28, 28)


def _fraction(model: dynnet.DynamicModel, x: torch.Tensor) -> float:
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    return float(t.mac_fraction().mean())


@pytest.mark.parametrize("recipe", RECIPES_OF_FAMILY)
def test_budget_is_reached_on_a_resnet20(recipe: str) -> None:
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet20", recipe=recipe, in_channels=1)
    scramble_until_mixed(model, diverse_inputs(8, SHAPE, seed=1))
    x, held_out = diverse_inputs(96, SHAPE, seed=11), diverse_inputs(96, SHAPE, seed=12)
    fractions = []
    for budget in (0.5, 0.75):
        report = dynnet.calibrate(model, x, budget, tolerance=0.02)
        assert report.within_tolerance, f"{recipe}: {report.summary()}"
        fractions.append(_fraction(model, held_out))
        assert fractions[-1] == pytest.approx(budget, abs=0.03), f"{recipe}: held-out {fractions[-1]:.3f} at {budget}"
    assert fractions[0] < fractions[1]


def test_family_recipes_all_declare_a_calibrated_budget() -> None:
    assert set(RECIPES_OF_FAMILY) == {
        "blockdrop",
        "convnet_aig",
        "dual_dynamic_inference",
        "dynamic_multipath",
        "energynet",
        "skipnet",
    }
    for recipe in RECIPES_OF_FAMILY:
        assert RECIPES.get(recipe).budget.calibrated, recipe
