"""RS-Nets: private batch norms per resolution, per-input resolution in sparse mode, exact MACs, objective."""

import copy
import itertools

import pytest
import torch

import dynnet
from dynnet.macs import MacCounter
from dynnet.methods.resolution.rs_nets import SwitchableBatchNorm2d, resolution_index


def _model() -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe="rs_nets", in_channels=1)


def test_switchable_batch_norm_uses_private_statistics() -> None:
    bn = torch.nn.BatchNorm2d(2)
    sbn = SwitchableBatchNorm2d(bn, 2).eval()
    with torch.no_grad():
        sbn.others[0].running_mean.fill_(1.0)
    x = torch.ones(1, 2, 2, 2)
    torch.testing.assert_close(sbn(x), bn.eval()(x))
    with resolution_index(1):
        torch.testing.assert_close(sbn(x), torch.zeros(1, 2, 2, 2), atol=1e-6, rtol=0)


def test_sparse_runs_each_sample_at_its_resolution() -> None:
    model = _model().eval()
    x = torch.randn(9, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.net.policy.fc.bias.zero_()
        model.net.policy.fc.weight.normal_(std=5.0, generator=torch.Generator().manual_seed(0))
        logits = model.net.policy(model.net.resize(x, 2))
        model.net.policy.fc.bias.copy_(-logits.median(0).values)  # centre each logit: choices differ per input
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    choice = tm.decisions["resolution"].hard.argmax(1)
    assert len(set(choice.tolist())) >= 2
    for r in range(3):
        rows = choice == r
        if rows.any():
            with torch.no_grad():
                torch.testing.assert_close(masked[rows], model.net.at(r, x[rows]), rtol=1e-5, atol=1e-5)
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as counter:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-5)
    assert counter.total == pytest.approx(float(ts.executed_macs().sum()), abs=0.5)
    costs = [model.net.cost(f"res{r}", lambda m, a, r=r: m.at(r, a), x) for r in range(3)]
    assert costs[0] > costs[1] > costs[2]
    policy = next(e for e in ts.entries if e.name == "policy").macs[0]
    torch.testing.assert_close(ts.macs(), torch.tensor(costs, dtype=torch.float64)[choice] + policy)


def test_objective_has_every_resolution_and_distillation() -> None:
    model = _model().train()
    x, y = torch.randn(6, 1, 32, 32), torch.arange(6)
    with dynnet.trace() as t:
        logits = model(x)
    out = model.compute_loss(logits, y, t, budget=0.5)
    assert {"task", "resolutions", "distill", "budget"} <= set(out.parts)
    out.total.backward()
    assert model.net.policy.fc.weight.grad.abs().sum() > 0
    # each resolution's private batch norm was trained on its own statistics
    bn = model.net.net.bn1
    assert not torch.equal(bn.running_mean, bn.others[1].running_mean)


def test_calibration_offset_favours_costlier_resolutions_monotonically() -> None:
    model = _model().eval()
    x = torch.randn(32, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.net.policy.fc.weight.normal_(std=3.0, generator=torch.Generator().manual_seed(0))
        model.net.policy.fc.bias.zero_()
    knob = model.budget_knob()
    costs = []
    for delta in (-50.0, -2.0, 0.0, 2.0, 50.0):
        knob.set(delta)
        with torch.no_grad(), dynnet.trace() as t:
            model(x)
        costs.append(t.decisions["resolution"].hard.argmax(1))
    # every input's resolution index never increases (its cost never decreases) as the offset grows
    for lo, hi in itertools.pairwise(costs):
        assert (hi <= lo).all()
    assert (costs[0] == 2).all() and (costs[-1] == 0).all()
    knob.set(0.0)
    report = dynnet.calibrate(model, x, 0.6, tolerance=0.05)
    assert report.within_tolerance


def test_base_weights_load_into_every_resolution() -> None:
    torch.manual_seed(3)
    base = dynnet.create_model("cifar_resnet8", in_channels=1)
    state = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.state_dict().items()}
    base.load_state_dict(state)
    model = _model()
    policy = copy.deepcopy(model.net.policy.state_dict())
    model.load_base_state_dict(state)
    loaded = model.net.state_dict()
    torch.testing.assert_close(loaded["net.conv1.weight"], state["conv1.weight"])
    torch.testing.assert_close(loaded["net.layer1.0.bn1.running_mean"], state["layer1.0.bn1.running_mean"])
    for r in (0, 1):  # the private batch norms start as the base's, as at conversion
        torch.testing.assert_close(loaded[f"net.layer1.0.bn1.others.{r}.weight"], state["layer1.0.bn1.weight"])
    for k, v in model.net.policy.state_dict().items():
        torch.testing.assert_close(v, policy[k])
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    dynnet.set_mode(model.eval(), "dense")
    with torch.no_grad():
        torch.testing.assert_close(model(x), base.eval()(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="missing"):
        model.load_base_state_dict({k: v for k, v in state.items() if "fc" not in k})
