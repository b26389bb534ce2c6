"""EnergyNet: the energy model, the energy-budget loss, and the recorded per-sample energy."""

import pytest
import torch

import dynnet
from dynnet.losses.energy import EnergyCosts, energy_budget_loss, layer_energy
from dynnet.testing import scramble_gates


def test_layer_energy_is_linear_in_its_counts() -> None:
    costs = EnergyCosts(mac=2.0, weight=10.0, activation=1.0)
    assert layer_energy(100, 5, 20, costs) == 2.0 * 100 + 10.0 * 5 + 20
    assert layer_energy(0, 0, 0) == 0
    with pytest.raises(ValueError):
        layer_energy(-1, 0, 0)


def test_energy_budget_loss_value_and_gradient() -> None:
    e = torch.tensor([30.0, 50.0], requires_grad=True)
    loss = energy_budget_loss(e, dense_energy=100.0, target=0.5)
    assert loss.item() == pytest.approx((0.4 - 0.5) ** 2)
    loss.backward()
    torch.testing.assert_close(e.grad, torch.full((2,), 2 * (0.4 - 0.5) / 100 / 2))


def test_recorded_energy_matches_the_block_model() -> None:
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="energynet", in_channels=1, width=0.5).eval()
    scramble_gates(model, seed=2, scale=2.0)
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    block = model.net.layer1[0]
    body_macs = 2 * 8 * 8 * 9 * 256
    weights = 2 * 8 * 8 * 9 + 2 * 2 * 8  # conv1, conv2, bn1, bn2 (gate and shortcut excluded)
    body, gate = block.body_energy(x[:, :1].expand(8, 8, 16, 16))
    assert body == pytest.approx(layer_energy(body_macs, weights, 2 * 8 * 256))
    z = t.decisions["layer1.0"].hard.double()
    torch.testing.assert_close(t.outputs["layer1.0/energy"][:, 0], z * body + gate)
    mixed = [n for n, d in t.decisions.items() if 0 < d.hard.mean() < 1]
    assert mixed, "scrambled gates should make mixed decisions"
    for name in mixed:
        recorded = t.outputs[f"{name}/energy"]
        torch.testing.assert_close(
            recorded[:, 0] - recorded[:, 0].min(),
            t.decisions[name].hard.double() * (recorded[:, 1] - recorded[:, 0].min()),
        )


def test_loss_is_mac_budget_plus_energy_cost_and_trains_the_gates() -> None:
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="energynet", in_channels=1, width=0.5, budget=0.3).train()
    x, y = torch.randn(64, 1, 16, 16), torch.arange(64) % 10
    with dynnet.trace() as t:
        logits = model(x)
    loss = model.compute_loss(logits, y, t)
    # gates start open (p = sigmoid(OPEN_LOGIT) = 0.95 under training noise): nearly all energy is spent (64 samples:
    # the mean of the noisy decisions lands at 0.93-0.95 over seeds; with 8 samples it drifted to 0.90 by chance)
    assert loss.parts["energy_fraction"] == pytest.approx(0.95, abs=0.04)
    # budget = MAC fraction: the budget term is the MAC-budget loss, not an energy target
    assert loss.parts["budget"] == pytest.approx(t.budget_loss(0.3).item(), rel=1e-6)
    expected = loss.parts["task"] + loss.parts["budget"] + 0.1 * loss.parts["energy_fraction"]
    assert loss.total.item() == pytest.approx(expected, rel=1e-5)
    loss.total.backward()
    assert model.net.layer3[0].gate.fc2.bias.grad.abs().sum() > 0


def test_energy_term_pushes_energy_heavy_blocks_harder() -> None:
    """Without the MAC term, the energy cost's push on each gate is the block's energy share: at equal MACs a block
    with more weights (a later, wider stage) is pushed closed harder than its MAC share says."""
    torch.manual_seed(0)
    model = dynnet.create_model(
        "cifar_resnet8", recipe="energynet", in_channels=1, width=0.5, budget_weight=0.0, energy_weight=1.0
    ).train()
    x = torch.randn(8, 1, 16, 16)
    with dynnet.trace() as t:
        model(x)
    constant_logits = torch.zeros(8, 10)  # no task gradient: only the energy cost reaches the decisions
    energy = model.compute_loss(constant_logits, torch.zeros(8, dtype=torch.long), t)
    hard = {n: d.hard for n, d in t.decisions.items()}
    grads = torch.autograd.grad(energy.total, list(hard.values()), allow_unused=True)
    body = {e.name.split("/")[0]: e.maximum for e in t.entries if e.name.endswith("/body")}
    per_mac = {n: float(g.sum()) / body[n] for n, g in zip(hard, grads, strict=True)}
    assert per_mac["layer3.0"] > per_mac["layer1.0"] > 0
