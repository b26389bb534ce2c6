"""The inference fast paths of the channel family: untraced sparse execution (batch 1 and batch N), cached
BN-folded weights and their invalidation, all-on and all-off decisions."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.testing import diverse_inputs, scramble_until_mixed

FAST_RECIPES = [
    "batch_shaping",
    "stochastic_neurons",
    "fbs",
    "gaternet",
    "rnp",
    "runtime_routing",
    "instance_sparsity",
    "channel_gating",
]


def _model(recipe: str, **config) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    config.setdefault("in_channels", 3)
    return dynnet.create_model("cifar_resnet8", recipe=recipe, num_classes=10, **config)


def _outputs(model: dynnet.DynamicModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked (traced), sparse untraced at batch N and sparse untraced one sample at a time."""
    model.eval()
    dynnet.set_mode(model, "masked")
    with torch.no_grad(), dynnet.trace():
        masked = model(x)
    dynnet.sparse(model)
    with torch.inference_mode():
        batch = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])
    return masked, batch, single


@pytest.mark.parametrize("recipe", FAST_RECIPES)
def test_untraced_sparse_matches_masked(recipe: str) -> None:
    model = _model(recipe)
    x = diverse_inputs(5, (3, 16, 16))
    scramble_until_mixed(model, x)
    masked, batch, single = _outputs(model, x)
    torch.testing.assert_close(batch, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["batch_shaping", "stochastic_neurons", "channel_gating"])
@pytest.mark.parametrize("state", ["all_on", "all_off"])
def test_all_on_and_all_off_decisions(recipe: str, state: str) -> None:
    model = _model(recipe)
    x = diverse_inputs(3, (3, 16, 16))
    on = state == "all_on"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if recipe == "channel_gating" and name.endswith("gate.threshold"):
                p.fill_(-1e4 if on else 1e4)
            elif recipe != "channel_gating" and name.endswith("gate.fc2.bias"):
                p.fill_(100.0 if on else -100.0)
    with torch.no_grad(), dynnet.trace() as t:
        dynnet.sparse(model)(x)
    expected = t.max_macs() if on else t.min_macs()
    torch.testing.assert_close(t.macs(), torch.as_tensor(expected, dtype=torch.float64).expand_as(t.macs()))
    masked, batch, single = _outputs(model, x)
    torch.testing.assert_close(batch, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["batch_shaping", "instance_sparsity", "channel_gating"])
def test_cached_weights_follow_in_place_parameter_edits(recipe: str) -> None:
    model = _model(recipe)
    x = diverse_inputs(4, (3, 16, 16))
    scramble_until_mixed(model, x)
    before = _outputs(model, x)[1]  # fills the caches
    block = model.net.layer1[0]
    with torch.no_grad():
        block.conv1.weight.mul_(1.5)
        if recipe != "channel_gating":
            block.bn1.running_var.mul_(2.0)
            block.bn2.bias.add_(0.5)
        else:
            block.conv2.weight.add_(0.1)
    masked, batch, single = _outputs(model, x)
    assert not torch.allclose(batch, before)
    torch.testing.assert_close(batch, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single, masked, rtol=1e-4, atol=1e-4)
    # load_state_dict copies in place too
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.net.layer1[0].parameters():
            p.mul_(0.5)
    model.load_state_dict(state)
    torch.testing.assert_close(_outputs(model, x)[1], batch)


def test_folded_weights_are_cached_and_keep_gradients_when_enabled() -> None:
    model = _model("batch_shaping").eval()
    block = model.net.layer1[0]
    with torch.no_grad():
        first = block.folded_weights()
        assert block.folded_weights()[0] is first[0]  # cached
    w1 = block.folded_weights()[0]  # gradients enabled: recomputed on the graph
    assert w1.requires_grad and w1 is not first[0]
