"""ConvNet-AIG, the core's reference recipe: analytic MACs, real skipping, training pulls the rate."""

import pytest
import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.testing import diverse_inputs, scramble_gates, scramble_until_mixed

# cifar_resnet8, width 1, input 3x32x32 — hand-computed MACs (1 MAC = one multiply-add).
STEM, FC, SHORTCUTS = 3 * 16 * 9 * 1024, 64 * 10, 16 * 32 * 256 + 32 * 64 * 64
BODY = {
    "layer1.0": 2 * 16 * 16 * 9 * 1024,
    "layer2.0": 16 * 32 * 9 * 256 + 32 * 32 * 9 * 256,
    "layer3.0": 32 * 64 * 9 * 64 + 64 * 64 * 9 * 64,
}
GATES = (16 * 16 + 16 * 2) * 2 + (32 * 16 + 16 * 2)  # training: fc1 + fc2 (two logits)
# Inference folds the gate's BN into fc1 and compares the two logits through one difference row.
GATES_EVAL = (16 * 16 + 16) * 2 + (32 * 16 + 16)


def _model() -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe="convnet_aig", budget=0.5).eval()


def test_per_sample_macs_match_hand_count() -> None:
    model = _model()
    scramble_gates(model, seed=5)
    x = diverse_inputs(16, (3, 32, 32))
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    z = {k: d.hard for k, d in t.decisions.items()}
    expected = STEM + FC + SHORTCUTS + GATES_EVAL + sum(z[k].double() * v for k, v in BODY.items())
    torch.testing.assert_close(t.macs(), expected)
    assert t.dense_macs() == STEM + FC + SHORTCUTS + sum(BODY.values())
    assert t.min_macs() == STEM + FC + SHORTCUTS + GATES_EVAL
    model.train()
    with dynnet.trace() as t_train:
        model(x)
    assert t_train.min_macs() == STEM + FC + SHORTCUTS + GATES
    assert 0 < torch.stack(list(z.values())).mean() < 1


def test_sparse_mode_really_skips_blocks() -> None:
    model = _model()
    with torch.no_grad():
        model.net.layer2[0].gate.fc2.bias.copy_(torch.tensor([10.0, -10.0]))  # always off
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), MacCounter() as masked:
        model(x)
    dynnet.sparse(model)
    with torch.no_grad(), MacCounter() as sparse:
        model(x)
    assert masked.total - sparse.total == 4 * BODY["layer2.0"]
    assert sparse.total == 4 * (STEM + FC + SHORTCUTS + GATES_EVAL + BODY["layer1.0"] + BODY["layer3.0"])


def test_compaction_runs_body_on_kept_samples_only() -> None:
    model = _model()
    x = diverse_inputs(9, (3, 32, 32))
    scramble_until_mixed(model, x)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t, MacCounter(model) as c:
        model(x)
    assert any(0 < int(t.decisions[n].hard.sum()) < 9 for n in BODY), "decisions should be mixed"
    for name, body in BODY.items():
        kept = int(t.decisions[name].hard.sum())
        by_module = c.by_module()
        conv_macs = by_module.get(f"net.{name}.conv1", 0) + by_module.get(f"net.{name}.conv2", 0)
        assert conv_macs == kept * body


@pytest.mark.parametrize("budget", [0.2])
def test_rate_loss_pulls_execution_rate_to_budget(budget: float) -> None:
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="convnet_aig", budget=budget, width=0.5, in_channels=1)
    gate_params = [p for n, p in model.named_parameters() if ".gate." in n]
    opt = torch.optim.Adam(gate_params, lr=0.1)
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
    model.train()
    for _ in range(20):
        with dynnet.trace() as t:
            logits = model(x)
        loss = model.compute_loss(logits, y, t)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    model.eval()
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    rate = torch.stack([d.hard.mean() for d in t.decisions.values()]).mean()
    assert rate < 0.6, f"execution rate {rate:.2f} did not move from 1.0 towards the budget {budget}"
