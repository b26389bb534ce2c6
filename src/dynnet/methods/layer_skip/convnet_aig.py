"""ConvNet-AIG — Veit & Belongie, "Convolutional Networks with Adaptive Inference Graphs", ECCV 2018.
https://openaccess.thecvf.com/content_ECCV_2018/papers/Andreas_Veit_Convolutional_Networks_with_ECCV_2018_paper.pdf

Every residual block gets a gate that looks at the block's input (global average pool → FC → BN →
ReLU → FC to two logits, off/on), trained with Gumbel-Softmax and straight-through hard decisions,
and a target-rate loss ``mean_g (mean_n z_{g,n} - t)^2`` that pulls each gate's execution rate to ``t``.

Departures from the paper:
* the target rate is one value for every gate (the paper also uses one; its schedule of per-layer
  targets is not reproduced);
* gates start open (bias trick) so the converted network reproduces the original at step 0, where
  the paper trains from scratch or fine-tunes with gates initialised near 0.5;
* at inference the decision is the argmax of the gate logits (the paper thresholds the same way).

Budget: trained and calibrated. ``budget`` (the target fraction of the dense MACs) is also the target execution
rate ``t`` of every gate in the target-rate loss (the paper's knob); calibration then shifts the open logit of every
gate by one offset (``calibration[0]``) until the mean MAC fraction on held-out images equals the budget.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels, replace_module, residual_blocks
from dynnet.core import Decision, DynamicModel, LossOutput, Trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.estimators import gumbel_softmax
from dynnet.gates import PooledMLPGate
from dynnet.losses import target_rate_loss
from dynnet.methods.layer_skip.gated_residual import GatedResidual

__all__ = ["AIGBlock", "ConvNetAIG", "ConvNetAIGConfig"]


@dataclass(frozen=True)
class ConvNetAIGConfig:
    """Settings of ConvNet-AIG.

    Attributes:
        budget: target mean fraction of the dense MACs per image; also the target execution rate of every gate in
            the target-rate loss (the paper's ``t``).
        hidden: hidden width of each gate (16 in the paper).
        tau: Gumbel-Softmax temperature (1 in the paper).
        rate_weight: weight of the target-rate loss (the authors' code uses 2).
    """

    budget: float = 0.5
    hidden: int = 16
    tau: float = 1.0
    rate_weight: float = 2.0

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if not self.rate_weight >= 0:
            raise ValueError(f"rate_weight must be >= 0, got {self.rate_weight}")


class AIGBlock(GatedResidual):
    """A residual block with a ConvNet-AIG gate on its input."""

    def gate_inference(self, x: Tensor) -> Tensor:
        """Tensor[N] bool: the open logit wins (BN folded, one logit difference)."""
        return self.gate.inference_open(x)

    def decide(self, x: Tensor) -> Decision:
        if not self.training:
            # Inference: the argmax of two logits (BN folded, one logit difference), without the softmax /
            # one-hot / straight-through work that would cost more than a skipped block saves at batch 1.
            return Decision(hard=self.gate_inference(x).to(x.dtype), soft=None, granularity="layer")
        logits = self.gate(x)
        sample, probs = gumbel_softmax(logits, self.tau, hard=True, noise=True)
        return Decision(hard=sample[:, 1], soft=probs[:, 1], granularity="layer")


class ConvNetAIG(DynamicModel):
    """The converted network; its objective is cross-entropy + ``rate_weight`` × target-rate loss."""

    def budget_knob(self) -> Knob:
        """One offset added to the open logit of every gate."""
        return self.logit_shift_knob([(b.gate.fc2.bias, b.gate.open_index, 1.0) for _, b in self.blocks()])

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        budget = self.config.budget if budget is None else budget
        task = F.cross_entropy(logits, target)
        decisions = list(t.decisions_of("layer").values())
        rate = target_rate_loss(decisions, budget) / len(decisions)
        total = task + self.config.rate_weight * rate
        return LossOutput(total, {"task": float(task.detach()), "rate": float(rate.detach())})


@recipe(
    "convnet_aig",
    paper="Convolutional Networks with Adaptive Inference Graphs (ECCV 2018), arXiv:1711.11503",
    budget=BudgetPolicy("trained+calibrated", knob="gate logit offset", reachable=(0.05, 1.0),
                        derives="target execution rate t of every gate = budget",
                        # standard profile, 2026-12-07: trained at 0.5 (90.86 %), calibrated to 0.25: 64.55 %, to 0.75:
                        # 88.52 %
                        transfers=False),
    # Its Gumbel gates' task gradient undoes a shifted gate bias (the offset reached -30 while the gates grew logits
    # above 27), and a Lagrange multiplier alone does not move gates that start saturated open (0.97 of the MACs after
    # 118 steps): both, the knob keeping the gates where their gradient is alive, the multiplier holding them.
    fine_tune={"track_budget": "both"},
)  # fmt: skip
def convert(model: nn.Module, config: ConvNetAIGConfig, targets: Targets = "auto") -> ConvNetAIG:
    """Put a ConvNet-AIG gate on every target residual block of ``model`` (in place)."""
    for name, block, adapter in residual_blocks(model, targets):
        gate = PooledMLPGate(adapter.in_channels(block), 2, config.hidden, open_index=1)
        new = AIGBlock(block, adapter, gate)
        new.block_name, new.tau = name, config.tau
        replace_module(model, name, new)
    return ConvNetAIG(model, recipe="convnet_aig", config=copy.copy(config), in_channels=first_conv_in_channels(model))
