"""PooledMLPGate's inference path (BN folded, cached) equals its modules, and never serves stale weights."""

import copy

import pytest
import torch

from dynnet.gates import PooledMLPGate


def _gate(open_index: int | None = 1, out: int = 2, seed: int = 0) -> PooledMLPGate:
    torch.manual_seed(seed)
    g = PooledMLPGate(8, out, hidden=6, open_index=open_index)
    with torch.no_grad():
        for p in g.parameters():
            p.copy_(torch.randn_like(p))
        g.bn.running_mean.copy_(torch.randn(6))
        g.bn.running_var.copy_(torch.rand(6) + 0.5)
    return g.eval()


@pytest.mark.parametrize("out,open_index", [(2, 1), (2, 0), (5, None), (1, None)])
def test_inference_logits_equal_the_modules(out: int, open_index: int | None) -> None:
    g = _gate(open_index, out)
    x = torch.randn(7, 8, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(g.inference_logits(x), g(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("open_index", [0, 1])
def test_inference_open_is_the_argmax(open_index: int) -> None:
    g = _gate(open_index)
    x = torch.randn(64, 8, 4, 4) + 3 * torch.randn(64, 8, 1, 1)
    with torch.no_grad():
        expected = g(x).argmax(1) == open_index
        got = g.inference_open(x)
    assert got.dtype == torch.bool and got.shape == (64,)
    assert torch.equal(got, expected)
    assert 0 < got.float().mean() < 1, "the test needs both decisions"


def test_inference_open_needs_a_two_logit_gate() -> None:
    with pytest.raises(ValueError, match="two-logit"):
        _gate(None, 3).inference_open(torch.randn(1, 8, 2, 2))
    three = _gate(1, 3)
    with torch.no_grad():
        torch.testing.assert_close(three.inference_logits(torch.ones(1, 8, 2, 2)), three(torch.ones(1, 8, 2, 2)))
    with pytest.raises(ValueError, match="two-logit"):
        three.inference_open(torch.randn(1, 8, 2, 2))


def test_cache_follows_in_place_edits_state_dicts_and_training() -> None:
    g = _gate()
    x = torch.randn(4, 8, 3, 3)
    with torch.no_grad():
        before = g.inference_logits(x).clone()
        g.fc1.weight.mul_(2.0)  # in-place edit: the version counter changes
        torch.testing.assert_close(g.inference_logits(x), g(x))
        assert not torch.allclose(g.inference_logits(x), before)
        other = _gate(seed=3)
        g.load_state_dict(other.state_dict())
        torch.testing.assert_close(g.inference_logits(x), other(x))
    g.train()
    g(torch.randn(16, 8, 3, 3))  # updates the running statistics
    g.eval()
    with torch.no_grad():
        torch.testing.assert_close(g.inference_logits(x), g(x))
    clone = copy.deepcopy(g)
    with torch.no_grad():
        clone.bn.weight.fill_(0.5)
        torch.testing.assert_close(clone.inference_logits(x), clone(x))


def test_training_mode_uses_the_modules_with_gradients() -> None:
    g = _gate().train()
    x = torch.randn(4, 8, 3, 3)
    g.inference_logits(x).sum().backward()
    assert all(p.grad is not None for p in g.parameters())


def test_inference_runs_under_inference_mode_then_with_autograd() -> None:
    g = _gate()
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    with torch.inference_mode():
        g.inference_logits(torch.randn(2, 8, 3, 3))  # fills the cache inside inference mode
    g.inference_logits(x).sum().backward()  # cached weights must not be inference tensors
    assert x.grad is not None
