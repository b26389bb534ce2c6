"""How the spatial recipes honour a budget: the knobs reach every inference path, the derived paper knobs, and the
bit-weighted cost of precision gating."""

from __future__ import annotations

import copy

import pytest
import torch

import dynnet
from dynnet.methods.spatial.gates import SqueezeMaskUnit
from dynnet.methods.spatial.precision_gating import PrecisionGatedConv
from dynnet.testing import diverse_inputs
from dynnet.testing.engines import kernel_engine

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(recipe: str, base: str = "cifar_resnet8", **kw) -> dynnet.DynamicModel:
    torch.manual_seed(0)
    return dynnet.create_model(base, recipe=recipe, in_channels=1, **kw)


def _fraction(model: dynnet.DynamicModel, x: torch.Tensor) -> float:
    dynnet.sparse(model)
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    return float(t.mac_fraction().mean())


@pytest.mark.parametrize(
    "recipe,base", [("dynconv", "cifar_resnet8"), ("stochastic_sampling_interp", "cifar_resnet8"),
                    ("sact", "cifar_resnet20")],
)  # fmt: skip
def test_the_knob_reaches_the_compiled_squeeze_units(recipe: str, base: str) -> None:
    """The offset edits the biases that ``squeeze_logits`` reads: the compiled units' logits move by it."""
    model = _model(recipe, base).eval()
    units = [m for m in model.modules() if isinstance(m, SqueezeMaskUnit)]
    x = torch.randn(2, units[0].conv.in_channels, 8, 8)
    knob = model.budget_knob()
    with kernel_engine("native"), torch.no_grad():
        before = units[0]._compiled(x)
        assert before is not None, "the compiled unit must be the inference path here"
        knob.set(1.5)
        after = units[0]._compiled(x)
    sign = -1.0 if recipe == "sact" else 1.0  # a positive SACT offset lowers the halting logits (halts later)
    torch.testing.assert_close(after, before + sign * 1.5)
    assert float(model.calibration[0]) == 1.5


@pytest.mark.parametrize("engine", ["native", "torch"])
@pytest.mark.parametrize("recipe", ["dynconv", "stochastic_sampling_interp", "pixel_attentional_gating"])
def test_the_knob_moves_the_sparse_mac_fraction_monotonically(recipe: str, engine: str) -> None:
    model = _model(recipe)
    x = diverse_inputs(4, (1, 16, 16))
    knob = model.budget_knob()
    fractions = []
    with kernel_engine(engine):
        for v in (-30.0, -6.0, -3.0, 0.0, 30.0):
            knob.set(v)
            fractions.append(_fraction(model, x))
    assert fractions == sorted(fractions)
    assert fractions[0] < 0.4 and fractions[-1] > 0.99


def test_sact_knob_spans_the_halting_range_and_its_macs_get_gradients() -> None:
    model = _model("sact", "cifar_resnet20")
    x = diverse_inputs(3, (1, 16, 16))
    knob = model.budget_knob()
    knob.set(-30.0)  # halt right after the first block of every stage
    low = _fraction(model, x)
    knob.set(30.0)  # never halt early
    high = _fraction(model, x)
    assert low < 0.4 and high > 0.99
    knob.set(0.0)
    # the MAC-budget loss reaches the halting units through the ACT remainders (the entry's value is 0)
    with torch.no_grad():
        for _, stage in model.blocks():
            for g in stage.gates:
                g.conv.bias.fill_(0.5)  # some positions halt early
    model.train()
    y = torch.arange(3)
    with dynnet.trace() as t:
        logits = model(x)
    remainders = [e for e in t.entries if e.name.endswith("/remainder")]
    assert remainders and all(float(e.macs.detach().abs().sum()) == 0.0 for e in remainders)
    t.budget_loss(0.3).backward()
    grad = model.net.layer1.gates[0].conv.bias.grad
    # above the budget: descent raises the halting logits (halts earlier); only the remainder carries a gradient
    assert grad is not None and float(grad) < 0
    assert model.compute_loss(logits.detach(), y, t).parts.keys() >= {"task", "budget", "aux"}


def test_precision_gating_costs_the_dense_network_open_and_the_low_pass_closed() -> None:
    model = _model("precision_gating")
    convs = [m for m in model.modules() if isinstance(m, PrecisionGatedConv)]
    x = diverse_inputs(2, (1, 16, 16))
    assert _fraction(model, x) == pytest.approx(1.0)  # thresholds start at -1e3: every position updated
    with torch.no_grad(), dynnet.trace() as t:
        model(x)
    static = t.dense_macs() - sum(e.dense for e in t.entries if e.name.endswith("/msb"))
    gated = sum(e.dense for e in t.entries if e.name.endswith("/msb"))
    knob = model.budget_knob()
    knob.set(knob.lo)  # every threshold above every prediction: only the 3-bit pass
    assert all(float(c.gate.threshold.detach()) > 100 for c in convs)
    assert _fraction(model, x) == pytest.approx((static + 3 / 8 * gated) / t.dense_macs())
    knob.set(0.0)
    assert all(float(c.gate.threshold.detach()) == -1e3 for c in convs)  # written from the values at offset 0
    with pytest.raises(ValueError, match="reach"):
        dynnet.create_model("cifar_resnet8", recipe="precision_gating", in_channels=1, budget=0.45, hb_bits=4)


def test_precision_gating_derives_the_high_precision_rate_from_the_budget() -> None:
    model = _model("precision_gating", budget=0.6)
    with torch.no_grad(), dynnet.trace() as t:
        model.eval()(diverse_inputs(2, (1, 16, 16)))
    r = model.high_rate(t)
    static = t.dense_macs() - sum(e.dense for e in t.entries if e.name.endswith("/msb"))
    gated = sum(e.dense for e in t.entries if e.name.endswith("/msb"))
    assert (static + (3 / 8 + r * 5 / 8) * gated) / t.dense_macs() == pytest.approx(0.6)
    fixed = dynnet.create_model("cifar_resnet8", recipe="precision_gating", in_channels=1, high_rate=0.3)
    assert fixed.high_rate(t) == 0.3


def test_pag_derived_pixel_rate_spends_the_budget_when_branches_scale_linearly() -> None:
    model = _model("pixel_attentional_gating", budget=0.6)
    with torch.no_grad(), dynnet.trace() as t:
        model.eval()(diverse_inputs(2, (1, 16, 16)))
    r = model.pixel_rate(t)
    others = sum(float(e.macs.mean()) for e in t.entries if not e.name.endswith("/body"))
    bodies = sum(e.maximum for e in t.entries if e.name.endswith("/body"))
    assert (others + r * bodies) / t.dense_macs() == pytest.approx(0.6)


def test_perforated_calibration_puts_the_masks_back_when_the_budget_is_out_of_reach() -> None:
    torch.manual_seed(0)
    base = dynnet.create_model("cifar_resnet8", in_channels=1)
    model = dynnet.convert(base, "perforated_cnn", budget=0.9, input_size=16, targets=["layer3.0"])
    x = diverse_inputs(4, (1, 16, 16))
    masks = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="outside"):
        dynnet.calibrate(model, x, 0.5)  # in the declared range, below what one perforated block reaches
    for k, v in model.state_dict().items():
        assert torch.equal(v, masks[k]), k
    report = dynnet.calibrate(model, x, 0.8)
    assert report.within_tolerance and report.thresholds["evaluated fraction"] == float(model.calibration[0])
