"""Stochastic binary neurons as channel gates — Bengio, Léonard & Courville, "Estimating or Propagating Gradients
Through Stochastic Neurons for Conditional Computation", arXiv 2013. https://arxiv.org/abs/1308.3432

Every residual block gets a gate on its input (global average pool → FC → BN → ReLU → FC) that emits one
pre-activation per inner channel; each channel's gate is a stochastic neuron, trained with one of the estimators
the paper compares (``estimator``):

* ``"straight_through"`` — stochastic binary unit, straight-through with the sigmoid's derivative;
* ``"straight_through_identity"`` — the same with the plain identity straight-through;
* ``"stochastic_times_smooth"`` — ``h = b · sqrt(sigmoid(a))``, ``b ~ Bernoulli(sqrt(sigmoid(a)))``;
* ``"noisy_rectifier"`` — ``h = max(0, a + z)``, Gaussian ``z``;
* ``"unbiased"`` — Bernoulli units trained by the unbiased likelihood-ratio (REINFORCE) estimator with a moving
  average baseline; the reward of a sample is ``-CE - cost_weight · MAC fraction``.

The gate output multiplies the block's inner channels (``conv1`` outputs = ``conv2`` inputs); a zero output
switches the channel off, and sparse mode computes only the channels with a non-zero gate.

Departures from the paper:
* the paper gates hidden units of fully connected networks (MNIST/conditional computation); here the units are the
  inner channels of residual blocks, with the gate computed from the block input;
* the unbiased estimator uses one scalar moving-average baseline (the paper also derives a per-unit optimal
  baseline) and a per-sample reward (negative loss and cost);
* the objective adds the library's MAC-budget loss (weight ``budget_weight``) to reach a target MAC fraction;
* gates start open (bias trick) so a fresh conversion reproduces the base network (exact for the binary units;
  ``stochastic_times_smooth`` and ``noisy_rectifier`` scale channels by a value close to, not equal to, 1);
* at inference the units are deterministic (threshold ``p > 1/2``; no rectifier noise).

Budget: trained and calibrated. ``budget`` is the target fraction of the dense MACs (gates included): the target of
the MAC-budget loss (and the MAC fraction in the unbiased estimator's reward is measured the same way); calibration
shifts every unit's pre-activation ``a`` by one offset (``calibration[0]``, an edit of the gates' final biases that
the compiled batch-1 call reads too) until the mean MAC fraction on held-out images equals the budget. Every
estimator's inference decision is a threshold on ``a`` (``a > 0``; ``sqrt(sigmoid(a)) > 1/2`` for
stochastic-times-smooth), so the offset moves the MACs monotonically. Reachable (declared): 0.1 to 1;
every channel off costs 0.06 of a ResNet-8 and 0.01 of a ResNet-20.
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
from dynnet.estimators.reinforce import bernoulli_log_prob, moving_average, reinforce_loss
from dynnet.estimators.stochastic_neurons import noisy_rectifier, st_binary, stochastic_times_smooth, unbiased_binary
from dynnet.gates import PooledMLPGate
from dynnet.kernels.channel import NativeGate
from dynnet.methods.channel._block import ChannelGatedBlock, convert_blocks, gated_channels

__all__ = ["ESTIMATORS", "StochasticNeuronBlock", "StochasticNeurons", "StochasticNeuronsConfig"]

ESTIMATORS = (
    "straight_through",
    "straight_through_identity",
    "stochastic_times_smooth",
    "noisy_rectifier",
    "unbiased",
)


@dataclass(frozen=True)
class StochasticNeuronsConfig:
    """Settings of stochastic-neuron channel gates.

    Attributes:
        budget: target mean fraction of the dense MACs per image (gates included): the MAC-budget loss's target and
            the calibration's.
        estimator: one of :data:`ESTIMATORS`.
        hidden: hidden width of each gate.
        noise_std: standard deviation of the noisy rectifier's noise.
        budget_weight: weight of the MAC-budget loss.
        cost_weight: weight of the MAC fraction in the unbiased estimator's reward.
        baseline_momentum: momentum of the unbiased estimator's moving-average baseline.
        strategy: sparse-mode batch strategy.
    """

    budget: float = 0.5
    estimator: str = "straight_through"
    hidden: int = 16
    noise_std: float = 1.0
    budget_weight: float = 1.0
    cost_weight: float = 1.0
    baseline_momentum: float = 0.9
    strategy: str = "auto"

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")


class StochasticNeuronBlock(ChannelGatedBlock):
    """A basic block whose inner channels are gated by stochastic neurons."""

    def __init__(self, *args, estimator: str = "straight_through", noise_std: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.estimator = estimator
        self.noise_std = noise_std

    def binary_scale(self) -> bool:
        return self.estimator in ("straight_through", "straight_through_identity", "unbiased")

    def sparse_scale(self, x: Tensor) -> Tensor:
        if self.training or not self.binary_scale():
            return super().sparse_scale(x)
        return self.gate.inference_logits(x).relu_()  # non-zero exactly where a > 0

    def native_gate(self) -> NativeGate | None:
        return self.gate.native_gate() if self.binary_scale() else None

    def decide(self, x: Tensor) -> tuple[Decision, Tensor]:
        if not self.training:
            a = self.gate.inference_logits(x)  # Tensor[N, C], the gate's BN folded
            if self.binary_scale():
                # Deterministic binary units: sigmoid(a) > 1/2, i.e. a > 0; p only when a trace records it.
                hard = (a > 0).to(a.dtype)
                p = torch.sigmoid(a) if current_trace() is not None else None
                return Decision(hard=hard, soft=p, granularity="channel"), hard
        else:
            a = self.gate(x)  # Tensor[N, C]
        sample = self.training
        if self.estimator == "straight_through":
            hard, value, p = st_binary(a, sample=sample)
        elif self.estimator == "straight_through_identity":
            hard, value, p = st_binary(a, sample=sample, identity=True)
        elif self.estimator == "stochastic_times_smooth":
            hard, value, p = stochastic_times_smooth(a, sample=sample)
        elif self.estimator == "noisy_rectifier":
            hard, value, p = noisy_rectifier(a, sample=sample, noise_std=self.noise_std)
        else:
            hard, value, p = unbiased_binary(a, sample=sample)
        return Decision(hard=hard, soft=p, granularity="channel"), value


class StochasticNeurons(DynamicModel):
    """The converted network; objective: CE + MAC budget (+ the REINFORCE surrogate for ``"unbiased"``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("reward_baseline", torch.zeros((), dtype=torch.float64))

    def budget_knob(self) -> Knob:
        """One offset added to every unit's pre-activation (the gates' final biases)."""
        return self.logit_shift_knob([(b.gate.fc2.bias, None, 1.0) for _, b in self.blocks()])

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        cfg = self.config
        budget = cfg.budget if budget is None else budget
        ce = F.cross_entropy(logits, target, reduction="none")
        task = ce.mean()
        total, parts = task, {"task": float(task.detach())}
        if cfg.budget_weight:
            b = t.budget_loss(budget)
            total = total + cfg.budget_weight * b
            parts["budget"] = float(b.detach())
        if cfg.estimator == "unbiased":
            decisions = list(t.decisions_of("channel").values())
            log_prob = sum(bernoulli_log_prob(d.soft, d.hard) for d in decisions)
            reward = -ce.detach().double() - cfg.cost_weight * t.mac_fraction().detach()
            policy = reinforce_loss(log_prob, reward.to(log_prob.dtype), self.reward_baseline.to(log_prob.dtype))
            if self.training:
                with torch.no_grad():
                    self.reward_baseline.copy_(moving_average(self.reward_baseline, reward, cfg.baseline_momentum))
            total = total + policy
            parts["policy"] = float(policy.detach())
        return LossOutput(total, parts)


@recipe(
    "stochastic_neurons",
    paper="Estimating or Propagating Gradients Through Stochastic Neurons for Conditional Computation "
    "(arXiv 2013), arXiv:1308.3432",
    budget=BudgetPolicy("trained+calibrated", knob="gate logit offset", reachable=(0.1, 1.0),
                        derives="MAC-budget loss target = budget",
                        # standard profile, 2026-12-07: trained at 0.5 (91.34 %), calibrated to 0.25: 41.08 %
                        transfers=False),
)  # fmt: skip
def convert(model: nn.Module, config: StochasticNeuronsConfig, targets: Targets = "auto") -> StochasticNeurons:
    """Put stochastic-neuron channel gates on every target residual block of ``model`` (in place): basic
    blocks, Bottlenecks and inverted residuals (:mod:`~dynnet.methods.channel._layout`)."""

    def make(name: str, block: nn.Module, adapter) -> StochasticNeuronBlock:
        gate = PooledMLPGate(adapter.in_channels(block), gated_channels(block), config.hidden, open_index=None)
        return StochasticNeuronBlock(
            block, adapter, gate, strategy=config.strategy, estimator=config.estimator, noise_std=config.noise_std
        )

    convert_blocks(model, targets, make)
    return StochasticNeurons(
        model, recipe="stochastic_neurons", config=copy.copy(config), in_channels=first_conv_in_channels(model)
    )
