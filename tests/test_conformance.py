"""The conformance suite: every registered recipe must pass it unchanged."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import dynnet
from dynnet.core import RECIPES
from dynnet.macs import MacCounter
from dynnet.testing import assert_decisions_mixed, build_recipe_pair, diverse_inputs, scramble_until_mixed

RECIPE_NAMES = dynnet.list_recipes()
BATCH = 6


def _inputs(recipe: str, n: int = BATCH, seed: int = 1) -> torch.Tensor:
    return diverse_inputs(n, RECIPES.get(recipe).test_input, seed=seed)


def _scrambled(recipe: str) -> tuple[torch.nn.Module, dynnet.DynamicModel]:
    """The base and a conversion whose gates take different decisions for different test inputs."""
    base, model = build_recipe_pair(recipe)
    scramble_until_mixed(model, _inputs(recipe, n=8), across_inputs=RECIPES.get(recipe).input_dependent)
    return base, model.eval()


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_output_shape_and_trace(recipe: str) -> None:
    _, model = build_recipe_pair(recipe)
    x = _inputs(recipe)
    with dynnet.trace() as t:
        y = model.eval()(x)
    assert y.shape == (BATCH, 10)
    assert t.macs().shape == (BATCH,)
    assert t.decisions, "a dynamic model must record its decisions"


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_every_parameter_gets_a_gradient(recipe: str) -> None:
    _, model = build_recipe_pair(recipe)
    model.train()
    x, y = _inputs(recipe), torch.arange(BATCH) % 10
    with dynnet.trace() as t:
        logits = model(x)
    loss = model.compute_loss(logits, y, t)
    loss.total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert torch.isfinite(loss.total)


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_open_gates_reproduce_base(recipe: str) -> None:
    if not RECIPES.get(recipe).reproduces_base:
        pytest.skip(f"{recipe} is its own architecture (documented in its docstring)")
    base, model = build_recipe_pair(recipe)
    x = _inputs(recipe)
    torch.testing.assert_close(model.eval()(x), base(x))
    dynnet.sparse(model)
    torch.testing.assert_close(model(x), base(x))


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_dense_mode_is_the_base_network(recipe: str) -> None:
    if not RECIPES.get(recipe).reproduces_base:
        pytest.skip(f"{recipe} is its own architecture")
    base, model = _scrambled(recipe)
    x = _inputs(recipe)
    dynnet.set_mode(model, "dense")
    torch.testing.assert_close(model(x), base(x))


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_eval_decisions_are_deterministic(recipe: str) -> None:
    _, model = _scrambled(recipe)
    x = _inputs(recipe)
    with dynnet.trace() as t1:
        y1 = model(x)
    with dynnet.trace() as t2:
        y2 = model(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert t1.decisions.keys() == t2.decisions.keys()
    for k in t1.decisions:
        assert torch.equal(t1.decisions[k].hard, t2.decisions[k].hard), k


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_sparse_equals_masked(recipe: str) -> None:
    _, model = _scrambled(recipe)
    x = _inputs(recipe, n=8)
    with dynnet.trace() as tm:
        masked = model(x)
    # Preconditions: with decisions all on, all off or without effect, sparse == masked would prove nothing.
    assert_decisions_mixed(tm, recipe)
    dynnet.set_mode(model, "dense")
    assert not torch.allclose(model(x), masked, rtol=1e-4, atol=1e-4), f"{recipe}: its decisions change no logit"
    dynnet.sparse(model)
    with dynnet.trace() as ts:
        sparse_out = model(x)
    torch.testing.assert_close(sparse_out, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ts.macs(), tm.macs())


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_macs_exact_and_bounded(recipe: str) -> None:
    spec = RECIPES.get(recipe)
    _, model = _scrambled(recipe)
    dynnet.sparse(model)
    x = _inputs(recipe, n=5)
    report = dynnet.count_macs(model, x)
    with dynnet.trace() as t:
        model(x)
    lo, hi = t.min_macs(), t.max_macs()
    assert (report.per_sample >= lo - 0.5).all() and (report.per_sample <= hi + 0.5).all()
    assert lo < hi and t.dense_macs() <= hi
    # The trace's executed MACs must match what the aten-level counter saw, sample by sample.
    assert report.executed.sum().item() == pytest.approx(report.total, abs=0.5)
    for i in range(x.shape[0]):
        with torch.no_grad(), dynnet.trace() as t1, MacCounter() as c:
            model(x[i : i + 1])
        assert t1.executed_macs().item() == pytest.approx(c.total, abs=0.5)
        assert t1.macs().item() == pytest.approx(report.per_sample[i].item(), abs=0.5)
        if spec.exact_executed:
            assert c.total == pytest.approx(report.per_sample[i].item(), abs=0.5)
        else:
            assert c.total >= report.per_sample[i].item() - 0.5


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_state_dict_round_trip(recipe: str) -> None:
    _, model = _scrambled(recipe)
    _, other = build_recipe_pair(recipe, seed=7)
    other.load_state_dict(copy.deepcopy(model.state_dict()), strict=True)
    x = _inputs(recipe)
    torch.testing.assert_close(other.eval()(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_pickle_deepcopy_and_torch_save_round_trip(recipe: str) -> None:
    """A converted model pickles, deep-copies and ``torch.save``\\ s like any ``nn.Module``: the copy computes the
    same logits in masked and sparse mode and owns its weights (no closure still pointing at the original)."""
    _, model = _scrambled(recipe)
    x = _inputs(recipe)
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = {
        "pickle": pickle.loads(pickle.dumps(model)),
        "deepcopy": copy.deepcopy(model),
        "torch.save": torch.load(buffer, weights_only=False),
    }
    for how, other in copies.items():
        assert type(other) is type(model), how
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0, msg=how)
        dynnet.sparse(other)
        torch.testing.assert_close(other(x), expected, rtol=1e-4, atol=1e-4, msg=how)
        with torch.no_grad():
            for p in other.parameters():
                p.zero_()
        assert not torch.equal(other(x), expected), f"{how}: the copy still computes with the original's weights"
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # zeroing the copies left the original alone


@pytest.mark.parametrize("recipe", [r for r in RECIPE_NAMES if not RECIPES.get(r).input_dependent])
def test_input_independent_recipes_decide_the_same_for_every_input(recipe: str) -> None:
    _, model = _scrambled(recipe)
    with dynnet.trace() as t:
        model(_inputs(recipe, n=8))
    for key, d in t.decisions.items():
        hard = d.hard.detach()
        assert torch.equal(hard, hard[:1].expand_as(hard)), f"{recipe}: decision {key} depends on the input"


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_inference_mode_first_then_no_grad_and_autograd(recipe: str) -> None:
    """Caches filled under torch.inference_mode (a deployment's first call) must not poison later calls."""
    _, model = _scrambled(recipe)
    dynnet.sparse(model)
    x = _inputs(recipe)
    with torch.inference_mode():
        first = model(x)
        model(x[:1])
    with torch.no_grad():
        torch.testing.assert_close(model(x), first)
    torch.testing.assert_close(model(x).detach(), first)
