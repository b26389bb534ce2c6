"""``torch.compile`` runs a dynamic model's masked mode (and its sparse mode, with graph breaks)."""

from __future__ import annotations

import pytest
import torch

import dynnet
from dynnet.testing import build_recipe_pair, diverse_inputs, scramble_until_mixed


@pytest.fixture
def model_and_input() -> tuple[dynnet.DynamicModel, torch.Tensor]:
    torch._dynamo.reset()
    _, model = build_recipe_pair("convnet_aig")
    x = diverse_inputs(8, (3, 32, 32), seed=2)
    scramble_until_mixed(model, x)
    return model.eval(), x


def test_compiled_masked_mode_is_one_graph_with_the_eager_logits(model_and_input) -> None:
    model, x = model_and_input
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
        # a second batch size recompiles (or reuses a dynamic graph) and stays right
        torch.testing.assert_close(compiled(x[:3]), model(x[:3]), rtol=1e-5, atol=1e-5)


def test_compiled_model_still_records_the_trace(model_and_input) -> None:
    model, x = model_and_input
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad(), dynnet.trace() as te:
        eager = model(x)
    with torch.no_grad(), dynnet.trace() as tc:
        out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tc.macs(), te.macs())
    assert tc.decisions.keys() == te.decisions.keys()


def test_compiled_training_step_matches_eager_gradients(model_and_input) -> None:
    model, x = model_and_input
    model.train()
    y = torch.arange(8) % 10

    def grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        model.zero_grad()
        # masked mode in training samples Gumbel noise: fix the generator state for both runs
        torch.manual_seed(0)
        with dynnet.trace() as t:
            logits = m(x)
        model.compute_loss(logits, y, t).total.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = grads(model)
    compiled = grads(torch.compile(model, backend="aot_eager"))
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_sparse_mode_breaks_the_graph_but_is_right(model_and_input) -> None:
    model, x = model_and_input
    with torch.no_grad():
        masked = model(x)
        dynnet.sparse(model)
        compiled = torch.compile(model, backend="eager")
        torch.testing.assert_close(compiled(x), masked, rtol=1e-4, atol=1e-4)


def _sparse_resnet20() -> tuple[dynnet.DynamicModel, list[torch.Tensor]]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet20", recipe="convnet_aig", budget=0.5, in_channels=1)
    xs = [diverse_inputs(n, (1, 16, 16), seed=s) for s, n in enumerate((16, 9, 16, 5, 12, 16, 7, 16))]
    scramble_until_mixed(model, xs[0])
    return dynnet.sparse(model), xs


def test_plain_compile_of_sparse_mode_hits_the_recompile_limit() -> None:
    """The precondition of compile_model: nine blocks of three widths, each with its own kept counts, are more
    specialisations than dynamo allows one piece of code."""
    model, xs = _sparse_resnet20()
    compiled = torch.compile(model, backend="eager")
    with (
        torch.no_grad(),
        torch._dynamo.config.patch(fail_on_recompile_limit_hit=True),
        pytest.raises(Exception, match="recompile"),
    ):
        for x in xs:
            compiled(x)


def test_compile_model_runs_sparse_mode_without_falling_back_and_matches_eager() -> None:
    from dynnet.export import compile_model

    model, xs = _sparse_resnet20()
    run = compile_model(model, backend="eager")
    with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for x in xs:
            with dynnet.trace() as tc:
                out = run(x)
            with dynnet.trace() as te:
                want = model(x)
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(tc.macs(), te.macs())
    assert model.net.layer1[0].mode == "sparse" and not model.training
