"""PAG, stochastic sampling + interpolation and precision gating: oracles for their distinctive parts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dynnet
from dynnet.core import Decision
from dynnet.gates.pooled import OPEN_LOGIT
from dynnet.macs import MacCounter
from dynnet.methods.spatial.precision_gating import PrecisionGatedConv, split_precision
from dynnet.methods.spatial.stochastic_sampling_interp import StochasticSamplingBlock, rbf_interpolate

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(recipe: str, **kw):
    torch.manual_seed(0)
    return dynnet.create_model("cifar_resnet8", recipe=recipe, in_channels=1, **kw)


# -- pixel-wise attentional gating ------------------------------------------------------------------------------


def test_pag_decisions_and_loss_parts() -> None:
    model = _model("pixel_attentional_gating").train()
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 2])
    with dynnet.trace() as t:
        logits = model(x)
    shapes = [tuple(d.hard.shape) for d in t.decisions.values()]
    assert shapes == [(3, 16, 16), (3, 8, 8), (3, 4, 4)]
    loss = model.compute_loss(logits, y, t, budget=0.5)
    assert set(loss.parts) == {"task", "rate", "budget"}
    # the per-block pixel rate is derived from the MAC budget: the rate at which the branches spend it
    rate = model.pixel_rate(t, 0.5)
    assert 0.01 < rate < 0.5
    # gates start open: in training each pixel is on with p = sigmoid(OPEN_LOGIT), so the rate term is
    # about (p - rate)^2 (Gumbel noise makes the realised rate vary around p)
    p_open = torch.sigmoid(torch.tensor(OPEN_LOGIT)).item()
    assert loss.parts["rate"] == pytest.approx((p_open - rate) ** 2, abs=0.02)
    loss.total.backward()
    assert model.net.layer1[0].gate.conv2.bias.grad.abs().sum() > 0


# -- stochastic sampling and interpolation ----------------------------------------------------------------------


def test_rbf_interpolation_oracle() -> None:
    branch = torch.zeros(1, 2, 3, 3)
    mask = torch.zeros(1, 3, 3)
    branch[0, :, 0, 0], mask[0, 0, 0] = torch.tensor([1.0, 2.0]), 1.0
    branch[0, :, 2, 2], mask[0, 2, 2] = torch.tensor([3.0, 5.0]), 1.0
    lam = 0.7
    out = rbf_interpolate(branch, mask, torch.tensor(math.log(lam)), 5)
    # (1, 1) is at squared distance 2 from both samples: the plain mean
    torch.testing.assert_close(out[0, :, 1, 1], torch.tensor([2.0, 3.5]))
    # (0, 1): distances² 1 and 5
    w1, w2 = math.exp(-lam * 1), math.exp(-lam * 5)
    expected = (w1 * torch.tensor([1.0, 2.0]) + w2 * torch.tensor([3.0, 5.0])) / (w1 + w2)
    torch.testing.assert_close(out[0, :, 0, 1], expected)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, 2.0]))  # sampled positions are kept


def test_rbf_interpolation_without_sampled_neighbours_has_bounded_gradients() -> None:
    # one sample in a 9x9 map: the far corner has no sampled neighbour in the 5x5 window
    features = torch.randn(1, 2, 9, 9, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 9, 9)
    mask[0, 0, 0] = 1.0
    mask.requires_grad_(True)  # straight-through: the hard mask carries the gradient
    out = rbf_interpolate(features * mask.unsqueeze(1), mask, torch.tensor(math.log(0.5)), 5)
    assert out[0, :, 8, 8].abs().max() == 0  # nothing to interpolate from: 0
    out.sum().backward()
    assert torch.isfinite(mask.grad).all() and mask.grad.abs().max() < 1e4  # 2e3; a 1e-6 divisor gave 2e7
    for huge in (50.0, 1e4):  # exp(log λ) overflows without the clamp: inf * 0 at the centre was NaN
        assert torch.isfinite(rbf_interpolate(features * mask.unsqueeze(1), mask, torch.tensor(huge), 5)).all()


def test_sampling_sparse_equals_masked_and_counts_interpolation() -> None:
    model = _model("stochastic_sampling_interp").eval()
    block = model.net.layer1[0]
    assert isinstance(block, StochasticSamplingBlock)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    d = Decision(hard=(torch.rand(2, 8, 8, generator=g) < 0.3).float(), soft=None, granularity="spatial")
    with torch.no_grad():
        masked = block(x, d)
        dynnet.set_mode(model, "sparse")
        with dynnet.trace() as t, MacCounter() as counter:
            sparse = block(x, d)
    torch.testing.assert_close(sparse, masked, rtol=1e-4, atol=1e-4)
    interp = next(e for e in t.entries if e.name.endswith("/interp"))
    assert interp.executed[0].item() == 8 * 8 * (16 + 1) * 25
    assert counter.total == t.executed_macs().sum().item()


def test_sampling_bandwidth_gets_gradient_when_pixels_are_skipped() -> None:
    model = _model("stochastic_sampling_interp").train()
    with torch.no_grad():
        for _, b in model.blocks():
            b.gate.mask.conv.bias.fill_(0.0)  # about half of the pixels sampled
    x, y = torch.randn(2, 1, 12, 12), torch.tensor([3, 4])
    with dynnet.trace() as t:
        logits = model(x)
    model.compute_loss(logits, y, t).total.backward()
    assert model.net.layer1[0].gate.log_bandwidth.grad.abs().item() > 0


# -- precision gating -------------------------------------------------------------------------------------------


def test_split_precision_is_exact_and_straight_through() -> None:
    x = torch.tensor([0.0, 0.3, 0.5, 1.26, 3.9], requires_grad=True)
    hb, lb = split_precision(x, 0.5)
    torch.testing.assert_close(hb, torch.tensor([0.0, 0.0, 0.5, 1.0, 3.5]))
    torch.testing.assert_close(hb + lb, x)
    hb.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5))


def test_precision_gating_runs_both_precisions() -> None:
    model = _model("precision_gating").eval()
    conv = model.net.layer1[0].conv1
    assert isinstance(conv, PrecisionGatedConv)
    assert "net.layer1.0.conv1.weight" in dict(model.named_parameters())  # base keys unchanged
    with torch.no_grad():
        conv.gate.threshold.fill_(0.0)
    x = torch.relu(torch.randn(2, 16, 8, 8))
    with torch.no_grad():
        masked = conv(x)
        dynnet.set_mode(model, "sparse")
        with dynnet.trace(), MacCounter() as counter:
            sparse = conv(x)
    torch.testing.assert_close(sparse, masked, rtol=1e-5, atol=1e-5)
    hb, _ = split_precision(x, conv.step)
    prediction = F.conv2d(hb, conv.weight, None, 1, 1)
    high = prediction.mean(1) > 0
    assert 0 < int(high.sum()) < high.numel()
    dense = 2 * 8 * 8 * 16 * 16 * 9
    assert counter.total == dense + int(high.sum()) * 16 * 16 * 9
    full = F.conv2d(x, conv.weight, None, 1, 1)
    torch.testing.assert_close(sparse.permute(0, 2, 3, 1)[high], full.permute(0, 2, 3, 1)[high], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sparse.permute(0, 2, 3, 1)[~high], prediction.permute(0, 2, 3, 1)[~high])
