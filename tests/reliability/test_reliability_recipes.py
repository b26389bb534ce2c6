"""Every registered recipe under the inputs and operations users throw at models: channels_last, a batch of one,
bfloat16, a training batch of one, ``copy.deepcopy`` (EMA copies, model soups).
"""

from __future__ import annotations

import copy

import pytest
import torch

import dynnet
from dynnet.core import RECIPES
from dynnet.testing import build_recipe_pair, diverse_inputs, scramble_until_mixed

pytestmark = pytest.mark.slow  # one model per recipe and test: seconds each on a loaded CPU


def _scrambled(recipe: str, n: int = 6) -> tuple[dynnet.DynamicModel, torch.Tensor]:
    _, model = build_recipe_pair(recipe)
    x = diverse_inputs(n, RECIPES.get(recipe).test_input, seed=4)
    scramble_until_mixed(model, x)
    return model.eval(), x


@pytest.mark.parametrize("recipe", dynnet.list_recipes())
def test_channels_last_batch_of_one_and_bfloat16(recipe: str) -> None:
    """Sparse mode (batch compaction) gives each sample the answer it gets alone, in either memory format; the
    model converted with ``.to(torch.bfloat16)`` runs bfloat16 inputs and its sparse mode equals its masked mode."""
    model, x = _scrambled(recipe, n=4)
    dynnet.sparse(model)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), y, rtol=1e-4, atol=1e-4)
        for i in range(x.shape[0]):
            torch.testing.assert_close(model(x[i : i + 1]), y[i : i + 1], rtol=1e-4, atol=1e-4)
        model.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        sparse_out = model(xb)
        masked = dynnet.set_mode(model, "masked")(xb)
    assert masked.dtype == torch.bfloat16 and torch.isfinite(masked.float()).all()
    # compaction changes the batch size of the convolutions, which may change bfloat16 rounding
    torch.testing.assert_close(sparse_out.float(), masked.float(), rtol=0.02, atol=0.02 * masked.abs().max().item())


@pytest.mark.parametrize("recipe", dynnet.list_recipes())
def test_training_batch_of_one(recipe: str) -> None:
    _, model = build_recipe_pair(recipe)
    x = diverse_inputs(1, RECIPES.get(recipe).test_input)
    with dynnet.trace() as t:
        logits = model.train()(x)
    loss = model.compute_loss(logits, torch.tensor([3]), t)
    loss.total.backward()
    assert logits.shape == (1, 10) and torch.isfinite(loss.total)


@pytest.mark.parametrize("recipe", dynnet.list_recipes())
def test_deepcopy_is_independent(recipe: str) -> None:
    """A deep copy runs on its own weights: poisoning the original's weights does not change the copy's output."""
    _, model = build_recipe_pair(recipe)
    x = diverse_inputs(2, RECIPES.get(recipe).test_input)
    with torch.no_grad():
        ref = model.eval()(x)
        clone = copy.deepcopy(model)
        for p in model.parameters():
            p.fill_(float("nan"))
        torch.testing.assert_close(clone(x), ref, rtol=0, atol=0)
