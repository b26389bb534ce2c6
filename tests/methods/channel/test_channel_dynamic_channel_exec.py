"""Dynamic channel execution: the CUCB bandit, its rewards, the fixed inference subset, sliced execution and MACs."""

from __future__ import annotations

import math

import pytest
import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.methods.channel.dynamic_channel_exec import (
    ChannelBandit,
    DynamicChannelExecBlock,
    cucb_scores,
    taylor_reward,
    top_k_mask,
)
from dynnet.testing import diverse_inputs


def _model(keep: float | None = None, **config) -> dynnet.DynamicModel:
    """A converted ResNet-8; ``keep``: every bandit plays that fraction of its channels (the budget's knob)."""
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="dynamic_channel_exec", num_classes=10, **config)
    if keep is not None:
        model.set_keep_fraction(keep)
    return model


def test_top_k_and_cucb_scores() -> None:
    assert top_k_mask(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2).tolist() == [False, True, False, True]
    assert top_k_mask(torch.zeros(4), torch.tensor(3)).tolist() == [True, True, True, False]  # ties: lowest index
    value, count = torch.tensor([0.5, 0.5, 0.2]), torch.tensor([4.0, 1.0, 0.0])
    s = cucb_scores(value, count, 10, 1.0)
    assert s[0].item() == pytest.approx(0.5 + math.sqrt(math.log(10) / 4))
    assert s[1] > s[0] and math.isinf(s[2].item())  # fewer plays: larger bonus; never played: tried first


def test_taylor_reward_oracle() -> None:
    a = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]], [[[0.0, 1.0]], [[1.0, 1.0]]]])  # Tensor[2, 2, 1, 2]
    g = torch.tensor([[[[1.0, 1.0]], [[1.0, 3.0]]], [[[2.0, -1.0]], [[1.0, 1.0]]]])
    # channel 0: |1+2| and |0-1| → mean 2; channel 1: |3-3| and |1+1| → mean 1
    assert taylor_reward(a, g).tolist() == [2.0, 1.0]


def test_bandit_finds_the_high_reward_arms() -> None:
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([0.2, 0.3, 0.9, 0.1, 0.25, 0.8, 0.3, 0.2])
    bandit = ChannelBandit(8, keep=2, exploration=math.sqrt(1.5))
    chosen = []
    for _ in range(400):
        played = bandit.explore_()
        assert int(played.sum()) == 2
        chosen.append(played)
        reward = (means + 0.1 * torch.randn(8, generator=g)).clamp(0, 1)
        bandit.update_(played, reward)
    assert bandit.fixed().nonzero().squeeze(1).tolist() == [2, 5]
    late = torch.stack(chosen[-100:]).float().mean(0)
    assert late[2] > 0.8 and late[5] > 0.8  # exploitation dominates once the estimates are good
    assert int(bandit.steps) == 400 and bandit.count.sum().item() == 800
    assert bandit.value[2].item() == pytest.approx(0.9, abs=0.05)


def test_training_selection_changes_and_rewards_are_observed() -> None:
    model = _model(keep=0.5).train()
    block = model.net.layer1[0]
    assert isinstance(block, DynamicChannelExecBlock)
    x, y = diverse_inputs(4, (3, 32, 32)), torch.arange(4)
    subsets = []
    for _ in range(3):
        with dynnet.trace() as t:
            logits = model(x)
        model.compute_loss(logits, y, t).total.backward()
        d = t.decisions[block.block_name]
        assert torch.equal(d.hard, d.hard[:1].expand_as(d.hard)), "one subset for the whole batch"
        assert int(d.hard[0].sum()) == 8
        subsets.append(d.hard[0].clone())
        if len(subsets) == 1:  # rewards normalised per step: the best played channel gets 1, unplayed ones nothing
            assert block.gate.value.max().item() == pytest.approx(1.0)
            assert torch.equal(block.gate.count > 0, subsets[0] > 0)
    # CUCB tries every channel first: 16 channels, 8 per step → the first two steps are disjoint
    assert not bool((subsets[0] * subsets[1]).any())
    assert int(block.gate.steps) == 3 and block.gate.count.sum().item() == 24
    assert 0.0 < block.gate.value.max().item() <= 1.0


def test_inference_subset_is_fixed_and_sparse_equals_masked() -> None:
    model = _model(keep=0.5).train()
    x, y = diverse_inputs(4, (3, 32, 32)), torch.arange(4)
    for _ in range(4):
        with dynnet.trace() as t:
            logits = model(x)
        model.compute_loss(logits, y, t).total.backward()
    model.eval()
    stats = {k: v.clone() for k, v in model.state_dict().items() if ".gate." in k}
    x = diverse_inputs(6, (3, 32, 32), seed=5)
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    with torch.no_grad(), dynnet.trace() as tm2:
        model(x[:2])
    for bandit in model.bandits():
        assert int(bandit.fixed().sum()) == int(bandit.keep) == bandit.channels // 2
        assert torch.equal(bandit.fixed(), top_k_mask(bandit.value, bandit.channels // 2))
    for k in tm.decisions:
        assert torch.equal(tm.decisions[k].hard[:2], tm2.decisions[k].hard), "eval subset independent of input"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items()), "eval forward changes no statistics"
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as counter:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ts.macs(), tm.macs())
    assert ts.executed_macs().sum().item() == pytest.approx(counter.total, abs=0.5)
    assert ts.executed_macs().sum().item() == pytest.approx(ts.macs().sum().item(), abs=0.5)


def test_macs_follow_the_kept_fraction() -> None:
    x = diverse_inputs(2, (3, 32, 32))
    body = {}
    for keep in (1.0, 0.5, 0.25):  # 16, 32, 64 channels: every block keeps exactly that fraction
        model = dynnet.sparse(_model(keep=keep))
        with torch.no_grad(), dynnet.trace() as t:
            model(x)
        body[keep] = sum(e.macs[0].item() for e in t.entries if e.name.endswith("/body"))
    assert body[0.5] == pytest.approx(0.5 * body[1.0])
    assert body[0.25] == pytest.approx(0.25 * body[1.0])


def test_statistics_are_in_the_state_dict_under_gate() -> None:
    model = _model(keep=0.5)
    keys = [k for k in model.state_dict() if ".gate." in k]
    assert {k.rsplit(".", 1)[1] for k in keys} == {"value", "count", "steps", "keep"}
    assert not [n for n, _ in model.named_parameters() if ".gate." in n], "the bandit has no parameters"
