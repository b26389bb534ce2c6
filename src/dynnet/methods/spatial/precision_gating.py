"""Precision Gating — Zhang, Zhu, Wang, Prashanth, Dally & Zhang (Yichi Zhang et al.), "Precision Gating: Improving
Neural Network Efficiency with Dynamic Dual-Precision Activations", ICLR 2020.
https://openreview.net/forum?id=SJgVU0EKwS (arXiv:2002.07136).

Every convolution inside a residual branch is split by the precision of its input activations: the
most-significant bits ``x_hb = step · floor(x / step)`` (``step = act_range / 2^hb_bits``) give a cheap
low-precision prediction ``O_hb = W * x_hb`` at every output position, and the remainder ``x_lb = x - x_hb``
is convolved only where the prediction is important, ``O = O_hb + G ⊙ (W * x_lb)``. The gate compares the
prediction with a learned threshold Δ (straight-through sigmoid in training, hard comparison at inference).
Sparse mode runs the low-precision convolution densely and the high-precision update with the gather
kernel at the gated positions only (:func:`dynnet.kernels.spatial.gather_conv2d`). Both precisions are
executed: the trace has ``<conv>/msb`` (dense, low precision) and ``<conv>/lsb`` (gated, high-precision update)
entries. Executed MACs count both in full (what the float kernels run: more than the dense network's); the
theoretical MACs use the paper's cost model, in which a MAC on ``b``-bit activations costs ``b / bits`` of a full
``bits``-bit one: the low-precision pass costs ``hb_bits / bits`` of the convolution, the update
``(bits - hb_bits) / bits`` per gated position, so an all-open gate costs exactly the dense network.

Objective: cross-entropy + ``rate_weight`` × ``mean_g (rate_g - r)^2``, with ``r`` (``high_rate``) the target
fraction of output positions that get the high-precision update.

Departures from the paper:
* the gate decides per output *position* (all output channels together), comparing the channel mean of
  the low-precision prediction with Δ; the paper gates every output element. Per-position gating is what
  a gather–GEMM kernel can execute on a CPU;
* the LSB part is the full-precision remainder (no quantisation of activations to B bits and no PACT
  clipping), so an all-open gate reproduces the float network exactly; ``act_range`` is a fixed setting,
  not learned;
* the paper's threshold regulariser (pulling Δ towards a target δ) is replaced by the target-rate loss;
* theoretical MACs are bit-weighted (above; ``exact_executed=False``): the paper counts bit-operations too, but a
  float CPU kernel runs both passes at full precision, which the executed MACs report.

Budget: trained and calibrated. ``budget`` is the target fraction of the dense MACs in that bit-weighted cost
(``hb_bits / bits`` of every gated convolution is always spent: with the defaults, 3 of 8 bits, budgets from about
0.45 are reachable). The paper's knob, the fraction of positions updated in high precision ``r`` (``high_rate``),
is derived from it at every step unless set: ``r = (budget · dense - static - low-precision MACs) / (update MACs
at r = 1)`` (:func:`~dynnet.methods.spatial._common.rate_for_budget`). Calibration subtracts one offset from the
threshold Δ of every convolution (the ``gate.threshold`` parameters, which every path reads; the offset is kept in
``calibration[0]``) until the mean MAC fraction on held-out images equals the budget.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels, replace_module
from dynnet.core import (
    Decision,
    DynamicBlock,
    DynamicModel,
    LossOutput,
    Trace,
    current_trace,
)
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.estimators import straight_through
from dynnet.kernels.spatial import gather_conv2d, scatter_add_rows
from dynnet.losses import target_rate_loss
from dynnet.methods.spatial._common import rate_for_budget, spatial_targets

__all__ = ["PrecisionGatedConv", "PrecisionGating", "PrecisionGatingConfig", "split_precision"]


@dataclass(frozen=True)
class PrecisionGatingConfig:
    """Settings of precision gating.

    Attributes:
        budget: target mean fraction of the dense MACs per image, in the paper's bit-weighted cost (a MAC on
            ``b``-bit activations costs ``b / bits``); must exceed ``hb_bits / bits``, the low-precision pass's share.
        high_rate: the target fraction of output positions updated in high precision (the paper's sparsity
            target); ``None`` (default): derived from ``budget`` at every step.
        hb_bits: bits of the low-precision prediction (the paper uses 2–4 of 8).
        bits: bits of a full-precision activation in the cost model (8 in the paper).
        act_range: activation range that the ``hb_bits`` levels cover (post-BN-ReLU activations ≈ [0, 4]).
        sharpness: slope of the straight-through sigmoid of the gate.
        rate_weight: weight of the target-rate loss.
    """

    budget: float = 0.5
    high_rate: float | None = None
    hb_bits: int = 3
    bits: int = 8
    act_range: float = 4.0
    sharpness: float = 5.0
    rate_weight: float = 2.0

    def __post_init__(self) -> None:
        if self.hb_bits < 1 or self.bits <= self.hb_bits or not self.act_range > 0:
            raise ValueError(
                f"need 1 <= hb_bits < bits and act_range > 0, got {self.hb_bits}, {self.bits}, {self.act_range}"
            )
        if not self.budget > self.hb_bits / self.bits:
            raise ValueError(
                f"budget {self.budget} cannot be reached: the {self.hb_bits}-bit pass alone costs "
                f"{self.hb_bits}/{self.bits} of every gated convolution; choose a budget above "
                f"{self.hb_bits / self.bits:.3f}"
            )
        if self.high_rate is not None and not 0.0 < self.high_rate <= 1.0:
            raise ValueError(f"high_rate must be a fraction in (0, 1] or None, got {self.high_rate}")


def split_precision(x: Tensor, step: float) -> tuple[Tensor, Tensor]:
    """``(x_hb, x_lb)``: the most-significant part ``step · floor(x / step)`` and the remainder (exact sum ``x``).

    Straight-through: the gradient passes to ``x`` through ``x_hb`` as through the identity.
    """
    hb = x - torch.remainder(x, step).detach()
    return hb, x - hb


class ThresholdGate(nn.Module):
    """The learned threshold Δ of one convolution (starts at -1e3: every position in high precision)."""

    def __init__(self) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(-1e3))

    def forward(self, prediction: Tensor) -> Tensor:
        """Tensor[N, C, H, W] low-precision prediction → gate logits Tensor[N, H, W]."""
        return prediction.mean(1) - self.threshold


class PrecisionGatedConv(DynamicBlock):
    """A convolution with dual-precision input activations; decisions are Tensor[N, H_out, W_out].

    Args:
        conv: the original convolution; its ``weight`` (and ``bias``) become this module's, so state-dict keys
            of the base network are unchanged (``layer1.0.conv1.weight``). Groups must be 1.
        config: :class:`PrecisionGatingConfig`.
    """

    granularity = "spatial"

    def __init__(self, conv: nn.Conv2d, config: PrecisionGatingConfig) -> None:
        super().__init__()
        if conv.groups != 1 or isinstance(conv.padding, str):
            raise ValueError(f"precision gating needs an explicitly padded convolution with groups=1, got {conv}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding, self.dilation = conv.stride[0], conv.padding[0], conv.dilation[0]
        self.gate = ThresholdGate()
        self.step = config.act_range / 2**config.hb_bits
        self.sharpness = config.sharpness
        self.low_share = config.hb_bits / config.bits  # the bit-weighted cost of the low-precision pass

    def _conv(self, x: Tensor, bias: bool = True) -> Tensor:
        return F.conv2d(x, self.weight, self.bias if bias else None, self.stride, self.padding, self.dilation)

    def _decide(self, prediction: Tensor) -> Decision:
        logits = self.gate(prediction) * self.sharpness
        prob = torch.sigmoid(logits)
        hard = straight_through((logits > 0).to(prob.dtype), prob)
        return Decision(hard=hard, soft=prob, granularity="spatial")

    def forward_dense(self, x: Tensor) -> Tensor:
        return self._conv(x)

    def forward_masked(self, x: Tensor) -> Tensor:
        hb, lb = split_precision(x, self.step)
        prediction = self._conv(hb)
        d = self._decide(prediction)
        out = prediction + d.hard.unsqueeze(1) * self._conv(lb, bias=False)
        self._record(x, d, None)
        return out

    def forward_sparse(self, x: Tensor) -> Tensor:
        hb, lb = split_precision(x, self.step)
        prediction = self._conv(hb)
        d = self._decide(prediction)
        mask = d.hard > 0.5
        if bool(mask.any()):
            rows = gather_conv2d(
                lb, self.weight, mask, stride=self.stride, padding=self.padding, dilation=self.dilation
            )
            out = scatter_add_rows(prediction, rows, mask.nonzero())
        else:
            out = prediction
        self._record(x, d, mask.flatten(1).sum(1).double() * self.weight.numel())
        return out

    def _record(self, x: Tensor, d: Decision, executed_lb: Tensor | None) -> None:
        t = current_trace()
        if t is None:
            return
        t.record_decision(self.block_name, d)
        dense = float(self.cost("conv", lambda m, inp: m._conv(inp), x))
        n = x.shape[0]
        low, high = self.low_share, 1.0 - self.low_share
        t.record_macs(
            f"{self.block_name}/msb", low * dense, batch_size=n, executed=dense, minimum=low * dense,
            maximum=low * dense, dense=dense,
        )  # fmt: skip
        per_position = self.weight.numel()
        lsb = d.hard.flatten(1).sum(1).double() * (per_position * high)
        t.record_macs(
            f"{self.block_name}/lsb", lsb, executed=dense if executed_lb is None else executed_lb, minimum=0.0,
            maximum=high * dense,
        )  # fmt: skip


class PrecisionGating(DynamicModel):
    """The converted network: cross-entropy + target rate of high-precision positions per convolution."""

    def budget_knob(self) -> Knob:
        """One offset subtracted from the threshold Δ of every convolution (a positive offset updates more
        positions in high precision). Each threshold is written as ``Δ_i - offset`` from the values at offset 0, so
        repeated settings do not accumulate rounding."""
        gates = [m.gate for m in self.modules() if isinstance(m, PrecisionGatedConv)]
        applied = float(self.calibration[0])
        zero = [float(g.threshold.detach()) + applied for g in gates]  # the thresholds at offset 0

        def set_(v: float) -> None:
            with torch.no_grad():
                for g, z in zip(gates, zero, strict=True):
                    g.threshold.fill_(z - float(v))
                self.calibration[0] = float(v)

        # Δ ≥ 1e3 closes every position (predictions are channel means of activations), Δ ≤ -1e3 opens every one
        return Knob("threshold offset", lambda: float(self.calibration[0]), set_, min(zero) - 1e3, max(zero) + 1e3)

    def high_rate(self, t: Trace, budget: float | None = None) -> float:
        """The target fraction of high-precision positions: ``config.high_rate``, or derived from the budget."""
        if self.config.high_rate is not None:
            return self.config.high_rate
        budget = self.config.budget if budget is None else budget
        return rate_for_budget(t, budget, lambda name: name.endswith("/lsb"))

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        budget = self.config.budget if budget is None else budget
        task = F.cross_entropy(logits, target)
        decisions = list(t.decisions_of("spatial").values())
        rate = target_rate_loss(decisions, self.high_rate(t, budget)) / len(decisions)
        total = task + self.config.rate_weight * rate
        return LossOutput(total, {"task": float(task.detach()), "rate": float(rate.detach())})


@recipe(
    "precision_gating",
    paper="Precision Gating: Improving Neural Network Efficiency with Dynamic Dual-Precision Activations "
    "(ICLR 2020), arXiv:2002.07136",
    budget=BudgetPolicy("trained+calibrated", knob="threshold offset", reachable=(0.45, 1.0),
                        derives="target high-precision rate r = (budget - static - hb_bits/bits of the gated "
                                "convolutions) / their update share",
                        # standard profile, 2026-12-07: trained at 0.5 (94.22 %), calibrated to 0.75: 93.50 %
                        transfers=False),
    exact_executed=False,
)  # fmt: skip
def convert(model: nn.Module, config: PrecisionGatingConfig, targets: Targets = "auto") -> PrecisionGating:
    """Make every convolution of the target residual branches precision-gated (in place)."""
    for name, block, _, stages in spatial_targets(model, targets, depthwise=False):
        convs = {id(st.conv) for st in stages}
        for child_name, child in list(block.named_children()):
            if id(child) in convs:
                new = PrecisionGatedConv(child, config)
                new.block_name = f"{name}.{child_name}"
                replace_module(model, new.block_name, new)
    return PrecisionGating(
        model, recipe="precision_gating", config=copy.copy(config), in_channels=first_conv_in_channels(model)
    )
