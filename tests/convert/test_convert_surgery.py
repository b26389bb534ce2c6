"""The classifier rule every recipe that replaces or reads a network's head shares: its last nn.Linear."""

from __future__ import annotations

import pytest
from torch import nn

import dynnet
from dynnet.convert import classifier_of, num_classes_of


def test_the_classifier_is_the_last_linear_in_module_order() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3)))
    name, fc = classifier_of(net)
    assert name == "2.0" and fc is net[2][0] and num_classes_of(net) == 3


@pytest.mark.parametrize("recipe", ["lsts", "gfnet", "visual_attention_action"])
def test_a_network_without_a_linear_classifier_is_refused_in_one_line_naming_the_recipe(recipe: str) -> None:
    headless = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError) as err:
        dynnet.convert(headless, recipe)
    message = str(err.value)
    assert "\n" not in message and recipe in message and "nn.Linear" in message
