"""Batch-shaping channel gates — Bejnordi, Blankevoort & Welling, "Batch-Shaping for Learning Conditional
Channel Gated Networks", ICLR 2020. https://arxiv.org/abs/1907.06627

Every residual block gets a gate on its input (global average pool → FC(16) → BN → ReLU → FC(C)) that emits one
logit per inner channel (the outputs of ``conv1``, i.e. the inputs of ``conv2``, as in the paper's ResNet
blocks). Training samples the gates with the Gumbel-sigmoid at temperature 2/3 and a straight-through hard
threshold; inference thresholds the logits at 0. The objective is cross-entropy + ``bs_weight`` × the batch-shaping
loss (empirical CDF of each gate's probabilities over the batch pulled towards a Beta prior) + ``l0_weight`` × the
mean probability of the gates being on (the paper's L0 term for the hard-concrete-style gates).

Sparse mode folds the batch norms and computes only the kept channels of ``conv1`` and ``conv2``
(:func:`dynnet.kernels.channel.sliced_pair`).

Departures from the paper:
* the Beta prior is ``Beta(ρ·s, (1 - ρ)·s)`` with ``s = prior_strength`` (1 by default), so its mean is ``ρ``, the
  kept-channel rate at which the network spends the budget (derived from the budget, see below); the paper sets the
  prior's parameters directly (Beta(0.6, 0.4) for 60 % of the channels);
* the paper's schedule (batch-shaping weight annealed to 0, L0 switched on after a warm-up) is replaced by
  constant weights, plus the library's MAC-budget loss with weight ``budget_weight`` (0 disables it) so that a
  short fine-tuning reaches the requested MAC fraction;
* the batch-shaping loss uses the gates' noise-free probabilities ``sigmoid(logit)`` and is divided by the
  batch size;
* gates start open (bias trick), so the converted network reproduces the base network at step 0, where the paper
  trains the gated network from a pretrained one with gates initialised at random.

Budget: trained and calibrated. ``budget`` is the target fraction of the dense MACs (gates included). Training
derives the Beta prior's mean from it — the kept-channel rate ``ρ = (budget·D − min) / (max − min)`` from the
trace's MAC bounds (the static part and the gates do not shrink), clamped to [0.01, 0.99] — and pulls the MAC
fraction to it with the MAC-budget loss; calibration then shifts every channel's gate logit by one offset
(``calibration[0]``, an edit of the gates' final biases that the compiled batch-1 call reads too) until the mean MAC
fraction on held-out images equals the budget. Reachable (declared): 0.1 to 1; every channel closed
costs 0.06 of a ResNet-8 and 0.01 of a ResNet-20 (the stem, the shortcuts, the head and the gates).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels
from dynnet.core import Decision, DynamicModel, LossOutput, Trace, current_trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.estimators import gumbel_sigmoid
from dynnet.gates import PooledMLPGate
from dynnet.kernels.channel import NativeGate
from dynnet.losses.batch_shaping import batch_shaping_loss
from dynnet.methods.channel._block import ChannelGatedBlock, convert_blocks, gated_channels
from dynnet.methods.channel._budget import variable_rate

__all__ = ["BatchShaping", "BatchShapingBlock", "BatchShapingConfig"]


@dataclass(frozen=True)
class BatchShapingConfig:
    """Settings of batch-shaping channel gating.

    Attributes:
        budget: target mean fraction of the dense MACs per image (gates included): the MAC-budget loss's target, and
            the source of the Beta prior's mean (the kept-channel rate that spends it) and of the calibration.
        hidden: hidden width of each gate (16 in the paper).
        tau: Gumbel-sigmoid temperature (2/3 in the paper).
        bs_weight: weight of the batch-shaping loss (0.75 in the paper's CIFAR-10 runs).
        l0_weight: weight of the mean gate probability (the L0 term).
        budget_weight: weight of the MAC-budget loss (not in the paper; 0 disables it).
        prior_strength: ``a + b`` of the Beta prior (1 in the paper; its mean is derived from ``budget``).
        strategy: sparse-mode batch strategy (see :mod:`dynnet.kernels.channel`).
    """

    budget: float = 0.6
    hidden: int = 16
    tau: float = 2.0 / 3.0
    bs_weight: float = 0.75
    l0_weight: float = 0.01
    budget_weight: float = 1.0
    prior_strength: float = 1.0
    strategy: str = "auto"


class BatchShapingBlock(ChannelGatedBlock):
    """A basic block whose inner channels are switched by a Gumbel-sigmoid gate on the block input."""

    def decide(self, x: Tensor) -> tuple[Decision, Tensor]:
        if not self.training:
            # Inference: the gate with its BN folded, thresholded at logit 0 (= noise-free sigmoid(l / tau) > 1/2);
            # the probabilities are only computed when a trace will record them.
            logits = self.gate.inference_logits(x)  # Tensor[N, C]
            hard = (logits > 0).to(logits.dtype)
            soft = torch.sigmoid(logits) if current_trace() is not None else None
            return Decision(hard=hard, soft=soft, granularity="channel"), hard
        logits = self.gate(x)  # Tensor[N, C]
        hard, prob = gumbel_sigmoid(logits, self.tau, hard=True, noise=self.training)
        d = Decision(hard=hard, soft=prob, granularity="channel")
        return d, hard

    def sparse_scale(self, x: Tensor) -> Tensor:
        if self.training:
            return super().sparse_scale(x)
        return self.gate.inference_logits(x).relu_()  # non-zero exactly where logit > 0

    def native_gate(self) -> NativeGate | None:
        return self.gate.native_gate()


class BatchShaping(DynamicModel):
    """The converted network; objective: CE + batch-shaping + L0 (+ MAC budget)."""

    def budget_knob(self) -> Knob:
        """One offset added to every channel's gate logit (the gates' final biases)."""
        return self.logit_shift_knob([(b.gate.fc2.bias, None, 1.0) for _, b in self.blocks()])

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        cfg = self.config
        budget = cfg.budget if budget is None else budget
        task = F.cross_entropy(logits, target)
        decisions = list(t.decisions_of("channel").values())
        rate = min(0.99, max(0.01, variable_rate(t, budget)))  # the prior's mean: the kept rate that spends the budget
        a, b = rate * cfg.prior_strength, (1.0 - rate) * cfg.prior_strength
        total, parts = task, {"task": float(task.detach())}
        if logits.shape[0] >= 2 and budget < 1.0:
            bs = sum(batch_shaping_loss(d.soft, a, b) for d in decisions) / len(decisions)
            total = total + cfg.bs_weight * bs
            parts["batch_shaping"] = float(bs.detach())
        l0 = sum(d.soft.mean() for d in decisions) / len(decisions)
        total = total + cfg.l0_weight * l0
        parts["l0"] = float(l0.detach())
        if cfg.budget_weight:
            mac = t.budget_loss(budget)
            total = total + cfg.budget_weight * mac
            parts["budget"] = float(mac.detach())
        return LossOutput(total, parts)


@recipe(
    "batch_shaping",
    paper="Batch-Shaping for Learning Conditional Channel Gated Networks (ICLR 2020), arXiv:1907.06627",
    budget=BudgetPolicy("trained+calibrated", knob="gate logit offset", reachable=(0.1, 1.0),
                        derives="Beta prior mean = the kept-channel rate that spends the budget; MAC-budget loss "
                        "target = budget",
                        # standard profile, 2026-12-07: trained at 0.5 (90.08 %), calibrated to 0.25: 48.67 %
                        transfers=False),
)  # fmt: skip
def convert(model: nn.Module, config: BatchShapingConfig, targets: Targets = "auto") -> BatchShaping:
    """Put a batch-shaping channel gate on every target residual block of ``model`` (in place): basic
    blocks, Bottlenecks and inverted residuals (:mod:`~dynnet.methods.channel._layout`)."""

    def make(name: str, block: nn.Module, adapter) -> BatchShapingBlock:
        gate = PooledMLPGate(adapter.in_channels(block), gated_channels(block), config.hidden, open_index=None)
        new = BatchShapingBlock(block, adapter, gate, strategy=config.strategy)
        new.tau = config.tau
        return new

    convert_blocks(model, targets, make)
    return BatchShaping(
        model, recipe="batch_shaping", config=copy.copy(config), in_channels=first_conv_in_channels(model)
    )
