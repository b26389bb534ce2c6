"""RANet: threshold calibration, samples that exit leave the batch, per-stage MACs exact."""

import pytest
import torch

import dynnet
from dynnet.gates import exit_fractions_for_rate, thresholds_for_fractions
from dynnet.macs import MacCounter
from dynnet.methods.resolution.ranet import RANet
from dynnet.testing.scramble import randomise

SHAPE = (1, 32, 32)


def _model() -> RANet:
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe="ranet", in_channels=1).eval()


def _x(n: int = 12) -> torch.Tensor:
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(4))


def test_thresholds_for_fractions_analytic() -> None:
    conf = torch.tensor([[0.9, 0.0], [0.8, 0.0], [0.3, 0.0], [0.2, 0.0]])
    thr = thresholds_for_fractions(conf, torch.tensor([0.5, 0.5]))
    assert thr.tolist() == [pytest.approx(0.8)]
    assert thresholds_for_fractions(conf, torch.tensor([0.0, 1.0])).isinf().all()
    torch.testing.assert_close(exit_fractions_for_rate(3, 0.5), torch.tensor([4, 2, 1], dtype=torch.float64) / 7)


def test_calibration_realises_the_exit_fractions() -> None:
    model = _model()
    randomise(model, torch.Generator().manual_seed(0))
    x = _x(40)
    conf = model.exit_confidences(x)
    model.calibrate(conf, q=1.0)  # a third of the samples at each exit
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    after0 = t.decisions["exit0"].hard
    after1 = t.decisions["exit1"].hard
    assert int((after0 == 0).sum()) == pytest.approx(40 / 3, abs=1)
    assert int(((after0 == 1) & (after1 == 0)).sum()) == pytest.approx(40 / 3, abs=1)


def test_exited_samples_keep_their_exit_logits_and_skip_later_stages() -> None:
    model = _model()
    randomise(model, torch.Generator().manual_seed(1))
    x = _x()
    model.calibrate(model.exit_confidences(x), q=1.0)
    with torch.no_grad(), dynnet.trace() as tm:
        masked = model(x)
    stage0 = tm.outputs["exit0"]
    left = tm.decisions["exit0"].hard == 0
    assert 0 < int(left.sum()) < x.shape[0]
    torch.testing.assert_close(masked[left], stage0[left])
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as ts, MacCounter() as counter:
        out = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-5)
    assert counter.total == pytest.approx(float(ts.executed_macs().sum()), abs=0.5)
    costs = model.net.stage_costs(model.net.inputs(x))
    z1 = tm.decisions["exit0"].hard.double()
    z2 = tm.decisions["exit1"].hard.double()
    torch.testing.assert_close(ts.macs(), costs[0] + z1 * costs[1] + z2 * costs[2])
    assert counter.total < x.shape[0] * sum(costs)  # sparse mode really ran less than every stage


def test_stage_costs_match_the_counter() -> None:
    model = _model()
    x = _x(2)
    xs = model.net.inputs(x)
    costs = model.net.stage_costs(xs)
    prev = None
    for s, c in enumerate(costs):
        with torch.no_grad(), MacCounter() as counter:
            prev, _ = model.net.stage(s, xs[s], prev)
        assert counter.total == 2 * c


def test_training_objective_is_the_budget_weighted_sum_of_exit_losses() -> None:
    model = _model().train()
    x, y = _x(6), torch.arange(6)
    with dynnet.trace() as t:
        logits = model(x)
    exits = [torch.nn.functional.cross_entropy(t.outputs[f"exit{s}"], y) for s in range(3)]
    fractions = t.outputs["ranet/exit_fractions"]
    costs = model.net.stage_costs(model.net.inputs(x))
    torch.testing.assert_close(fractions, torch.tensor(costs, dtype=torch.float64).cumsum(0) / sum(costs))
    for budget in (0.3, 0.6, 0.9):
        w = model.exit_weights(fractions, budget)
        assert float(w.sum()) == pytest.approx(3.0)
        p = (w - 0.5) / 1.5  # exit_weighting 0.5: w = 0.5 + 0.5 * 3 * p
        assert float((p * fractions).sum()) == pytest.approx(budget, abs=1e-6)  # the profile's expected MACs
        loss = model.compute_loss(logits, y, t, budget=budget)
        torch.testing.assert_close(loss.total, sum(float(w[s]) * exits[s] for s in range(3)))
    low, high = model.exit_weights(fractions, 0.3), model.exit_weights(fractions, 0.9)
    assert low[0] > high[0] and low[2] < high[2]  # a small budget weights the early exits, a large one the last
    torch.manual_seed(0)
    plain = dynnet.create_model("cifar_resnet8", recipe="ranet", in_channels=1, exit_weighting=0.0).train()
    with dynnet.trace() as t:
        logits = plain(x)
    loss = plain.compute_loss(logits, y, t)
    torch.testing.assert_close(
        loss.total, sum(torch.nn.functional.cross_entropy(t.outputs[f"exit{s}"], y) for s in range(3))
    )


def test_calibrate_sets_thresholds_for_the_budget_and_round_trips() -> None:
    model = _model()
    randomise(model, torch.Generator().manual_seed(0))
    x = _x(64)
    report = dynnet.calibrate(model, x, 0.5)
    assert report.within_tolerance
    assert torch.isfinite(model.net.thresholds).all()
    # the thresholds are MSDNet's geometric profile with the calibrated rate
    q = float(model.calibration[0].exp())
    torch.testing.assert_close(
        model.net.thresholds, thresholds_for_fractions(model.exit_confidences(x), exit_fractions_for_rate(3, q))
    )
    torch.manual_seed(5)
    other = dynnet.create_model("cifar_resnet8", recipe="ranet", in_channels=1).eval()
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other.net.thresholds, model.net.thresholds)
    assert other.calibrated_budget == pytest.approx(0.5)
