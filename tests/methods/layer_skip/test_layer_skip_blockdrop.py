"""BlockDrop: one policy pass, curriculum, self-critical REINFORCE, real block dropping."""

import pytest
import torch

import dynnet
from dynnet.estimators.reinforce import bernoulli_log_prob, reinforce_loss, self_critical_advantage
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
    correct, kept = torch.tensor([True, True, False]), torch.tensor([1.0, 0.5, 0.2])
    r = blockdrop_reward(correct, kept, penalty=5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.75, -5.0], dtype=torch.float64))
    macs = torch.tensor([0.9, 0.5, 0.3])
    r = blockdrop_reward(correct, kept, 5.0, macs, budget=0.5, budget_weight=2.0)
    torch.testing.assert_close(r, torch.tensor([0.0 - 2 * 0.16, 0.75, -5.0 - 2 * 0.04], dtype=torch.float64))


def test_budget_term_uses_each_policys_mac_fraction() -> None:
    """The budget term of the sampled and of the greedy policy is each one's own MAC fraction (policy included)."""
    model = _model(penalty=0.0, ce_weight=0.0, budget=0.4, budget_weight=1.0).train()
    with torch.no_grad():
        model.policy.net.fc.bias.copy_(torch.tensor([6.0, 0.3, -6.0]))  # keep, sample (greedy: keep), drop
    x, y = _x(32, seed=4), torch.arange(32) % 10
    with dynnet.trace() as t:
        logits = model(x)
    prob = torch.stack([d.soft for d in t.decisions.values()], 1)
    action = torch.stack([d.hard for d in t.decisions.values()], 1)
    greedy = t.outputs["greedy_policy"]
    m = t.mac_fraction().detach()
    with torch.no_grad(), dynnet.trace() as tg:  # eval decides p > 0.5: the greedy policy
        model.eval()(x)
    assert torch.equal(torch.stack([d.hard for d in tg.decisions.values()], 1), greedy)
    m_greedy = tg.mac_fraction()
    assert not torch.equal(m, m_greedy)
    correct, correct_greedy = logits.argmax(1) == y, t.outputs["greedy_logits"].argmax(1) == y
    reward = torch.where(correct, 1 - action.double().mean(1) ** 2, 0.0) - (m - 0.4) ** 2
    greedy_reward = torch.where(correct_greedy, 1 - greedy.double().mean(1) ** 2, 0.0) - (m_greedy - 0.4) ** 2
    loss = model.compute_loss(logits, y, t)
    assert loss.parts["reward"] == pytest.approx(reward.mean().item())
    expected = reinforce_loss(bernoulli_log_prob(prob, action), self_critical_advantage(reward, greedy_reward))
    assert loss.parts["reinforce"] == pytest.approx(expected.item(), rel=1e-5)


def test_calibration_moves_the_policy_and_round_trips() -> None:
    # at 16x16 the default policy (a half-width ResNet-8 on 16x16) costs as much as this half-width ResNet-8 base:
    # a smaller policy leaves the blocks something to save
    model = _model(policy_resolution=8, policy_width=0.25).eval()
    scale = torch.linspace(0.2, 3.0, 64).view(-1, 1, 1, 1)
    with torch.no_grad():
        model.policy.net.fc.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    x = _x(64, seed=5) * scale
    report = dynnet.calibrate(model, x, 0.6, tolerance=0.04)
    assert report.within_tolerance and "policy logit offset" in report.thresholds
    other = _model(policy_resolution=8, policy_width=0.25)
    other.load_state_dict(model.state_dict())
    dynnet.sparse(other.eval())
    with torch.no_grad(), dynnet.trace() as t:
        other(x)
    assert float(t.mac_fraction().mean()) == pytest.approx(report.mac_fraction, abs=1e-9)


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
