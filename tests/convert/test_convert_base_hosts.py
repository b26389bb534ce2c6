"""Base weights load into recipes that build their network around copies of the base (GFNet's two encoders, LSTS's
fine network, visual attention's trunk); a recipe whose network does not contain the base refuses in one line."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.core.model import base_hosts


def _trained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    base = dynnet.create_model("cifar_resnet8", in_channels=1)
    state = {k: v + 0.25 if v.is_floating_point() else v for k, v in base.state_dict().items()}
    return dict(sorted(state.items()))  # as a safetensors file gives them: the classifier is not last


@pytest.mark.parametrize(
    ("recipe", "hosts"),
    [("gfnet", ["global_encoder", "local_encoder"]), ("lsts", ["fine"]), ("visual_attention_action", ["trunk"])],
)
def test_base_weights_load_into_every_copy_of_the_base(recipe: str, hosts: list[str]) -> None:
    state = _trained_state()
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe=recipe, in_channels=1)
    added = {n: p.detach().clone() for n, p in model.named_parameters() if not any(f".{h}." in f".{n}" for h in hosts)}
    assert sorted(base_hosts(model.net, state)) == hosts
    model.load_base_state_dict(state)
    loaded = model.net.state_dict()
    for host in hosts:
        for key in ("conv1.weight", "layer1.0.bn1.running_mean", "layer2.0.conv2.weight"):
            torch.testing.assert_close(loaded[f"{host}.{key}"], state[key])
    for name, before in added.items():  # what the recipe added around the copies keeps its initialisation
        torch.testing.assert_close(dict(model.named_parameters())[name], before)


@pytest.mark.parametrize("recipe", ["dcn", "ram"])
def test_a_network_without_the_base_refuses_its_weights(recipe: str) -> None:
    model = dynnet.create_model("cifar_resnet8", recipe=recipe, in_channels=1)
    with pytest.raises(KeyError, match="does not contain the base; train it from scratch"):
        model.load_base_state_dict(_trained_state())
