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
counted and executed: the trace has ``<conv>/msb`` (dense, low precision) and ``<conv>/lsb`` (gated,
high-precision update) entries, so theoretical MACs are ≥ the dense network's — the saving of precision
gating is in bit-operations (``hb_bits``-bit vs full-precision MACs), which the MAC count does not see.

Objective: cross-entropy + ``rate_weight`` × ``mean_g (rate_g - budget)^2``, with ``budget`` the target
fraction of output positions that get the high-precision update.

Departures from the paper:
* the gate decides per output *position* (all output channels together), comparing the channel mean of
  the low-precision prediction with Δ; the paper gates every output element. Per-position gating is what
  a gather–GEMM kernel can execute on a CPU;
* the LSB part is the full-precision remainder (no quantisation of activations to B bits and no PACT
  clipping), so an all-open gate reproduces the float network exactly; ``act_range`` is a fixed setting,
  not learned;
* the paper's threshold regulariser (pulling Δ towards a target δ) is replaced by the target-rate loss.
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
    RecipeSpec,
    Trace,
    current_trace,
    register_recipe,
)
from dynnet.estimators import straight_through
from dynnet.kernels.spatial import gather_conv2d, scatter_add_rows
from dynnet.losses import target_rate_loss
from dynnet.methods.spatial._common import spatial_targets

__all__ = ["PrecisionGatedConv", "PrecisionGating", "PrecisionGatingConfig", "split_precision"]


@dataclass(frozen=True)
class PrecisionGatingConfig:
    """Settings of precision gating.

    Attributes:
        budget: target fraction of output positions computed in high precision.
        hb_bits: bits of the low-precision prediction (the paper uses 2–4 of 8).
        act_range: activation range that the ``hb_bits`` levels cover (post-BN-ReLU activations ≈ [0, 4]).
        sharpness: slope of the straight-through sigmoid of the gate.
        rate_weight: weight of the target-rate loss.
    """

    budget: float = 0.5
    hb_bits: int = 3
    act_range: float = 4.0
    sharpness: float = 5.0
    rate_weight: float = 2.0


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
        t.record_macs(f"{self.block_name}/msb", dense, batch_size=n, minimum=dense, maximum=dense, dense=dense)
        per_position = self.weight.numel()
        lsb = d.hard.flatten(1).sum(1).double() * per_position
        t.record_macs(
            f"{self.block_name}/lsb", lsb, executed=dense if executed_lb is None else executed_lb, minimum=0.0,
            maximum=dense,
        )  # fmt: skip


class PrecisionGating(DynamicModel):
    """The converted network: cross-entropy + target rate of high-precision positions per convolution."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        budget = self.config.budget if budget is None else budget
        task = F.cross_entropy(logits, target)
        decisions = list(t.decisions_of("spatial").values())
        rate = target_rate_loss(decisions, budget) / len(decisions)
        total = task + self.config.rate_weight * rate
        return LossOutput(total, {"task": float(task.detach()), "rate": float(rate.detach())})


def convert(model: nn.Module, config: PrecisionGatingConfig, targets: Targets = "auto") -> PrecisionGating:
    """Make every convolution of the target residual branches precision-gated (in place)."""
    if config.hb_bits < 1 or config.act_range <= 0:
        raise ValueError(f"hb_bits must be >= 1 and act_range > 0, got {config.hb_bits}, {config.act_range}")
    for name, block, _, stages in spatial_targets(model, targets):
        convs = {id(st.conv) for st in stages}
        for child_name, child in list(block.named_children()):
            if id(child) in convs:
                new = PrecisionGatedConv(child, config)
                new.block_name = f"{name}.{child_name}"
                replace_module(model, new.block_name, new)
    return PrecisionGating(
        model, recipe="precision_gating", config=copy.copy(config), in_channels=first_conv_in_channels(model)
    )


SPEC = register_recipe(
    RecipeSpec(
        name="precision_gating",
        family="spatial",
        config_cls=PrecisionGatingConfig,
        convert=convert,
        paper="Precision Gating: Improving Neural Network Efficiency with Dynamic Dual-Precision Activations "
        "(ICLR 2020), arXiv:2002.07136",
    )
)
