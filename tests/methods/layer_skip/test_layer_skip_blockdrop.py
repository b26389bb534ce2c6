"""BlockDrop: one policy pass, curriculum, self-critical REINFORCE, real block dropping."""

import pytest
import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.methods.layer_skip.blockdrop import blockdrop_reward

# cifar_resnet8 width 0.5 (8/16/32 channels), 1x16x16 input: hand-counted body MACs per sample.
BODY = {
    "layer1.0": 2 * 8 * 8 * 9 * 256,
    "layer2.0": 8 * 16 * 9 * 64 + 16 * 16 * 9 * 64,
    "layer3.0": 16 * 32 * 9 * 16 + 32 * 32 * 9 * 16,
}


def _model(**kw: object) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe="blockdrop", in_channels=1, width=0.5, **kw)


def _x(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_reward() -> None:
    r = blockdrop_reward(torch.tensor([True, True, False]), torch.tensor([1.0, 0.5, 0.2]), penalty=5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.75, -5.0], dtype=torch.float64))


def test_dropping_a_block_removes_exactly_its_macs() -> None:
    model = _model().eval()
    with torch.no_grad():
        model.policy.net.fc.bias.copy_(torch.tensor([6.0, -6.0, 6.0]))  # drop layer2.0 for everyone
    x = _x(4)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t, MacCounter(model) as c:
        model(x)
    assert t.decisions["layer2.0"].hard.sum() == 0
    by_module = c.by_module()
    assert by_module.get("net.layer2.0.conv1", 0) + by_module.get("net.layer2.0.conv2", 0) == 0
    assert by_module["net.layer1.0.conv1"] + by_module["net.layer1.0.conv2"] == 4 * BODY["layer1.0"]
    policy = [e for e in t.entries if e.name == "policy"]
    assert len(policy) == 1 and c.total == t.executed_macs().sum().item()  # the policy runs once
    assert by_module["policy"] == 4 * policy[0].macs[0].item()


def test_curriculum_keeps_the_first_blocks_in_training() -> None:
    model = _model().train()
    with torch.no_grad():
        model.policy.net.fc.bias.fill_(-6.0)  # the policy would drop everything
    model.curriculum = 1
    with dynnet.trace() as t:
        model(_x())
    assert t.decisions["layer1.0"].hard.mean() == 1 and t.decisions["layer2.0"].hard.mean() == 1
    assert t.decisions["layer3.0"].hard.mean() < 1


def test_self_critical_baseline_cancels_when_sample_equals_greedy() -> None:
    model = _model(alpha=1.0, ce_weight=0.0).train()
    x, y = _x(), torch.arange(8) % 10
    with dynnet.trace() as t:  # open policy: p ≈ 0.9975, sampled == greedy almost surely
        logits = model(x)
    assert "greedy_logits" in t.outputs
    sampled = torch.stack([d.hard for d in t.decisions.values()], 1)
    if not torch.equal(sampled, t.outputs["greedy_policy"]):
        pytest.skip("a rare sample differed from the greedy policy")
    loss = model.compute_loss(logits, y, t)
    loss.total.backward()
    assert model.policy.net.fc.bias.grad.abs().max() == 0  # zero advantage everywhere


def test_policy_gradient_follows_the_advantage() -> None:
    model = _model(alpha=1.0, ce_weight=0.0).train()
    with torch.no_grad():
        model.policy.net.fc.bias.fill_(0.0)
    x, y = _x(64, seed=3), torch.arange(64) % 10
    with dynnet.trace() as t:
        logits = model(x)
    loss = model.compute_loss(logits, y, t)
    loss.total.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("policy.")]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
