"""EnergyNet — Wang, Nguyen, Zhao, Wang, Lin & Baraniuk, "EnergyNet: Energy-Efficient Dynamic Inference",
NeurIPS 2018 Workshop on Compact Deep Neural Networks. https://openreview.net/forum?id=Syxp2bgKoX

A skip policy over the residual blocks trained with an *energy* cost: each block's energy is
``e_mac · MACs + e_weight · weights + e_activation · feature-map words``
(:func:`dynnet.losses.energy.layer_energy`, Horowitz's 45 nm costs), so a block with many weights (late,
wide stages) is worth more to skip than its MACs alone say. The objective is cross-entropy
+ ``budget_weight`` × the MAC-budget loss + ``energy_weight × E / E_dense`` with ``E`` the energy of the executed
blocks and gates (the paper's energy cost, weighted by its trade-off coefficient).

Departures from the paper:
* gates are feed-forward (pooled features → MLP → one logit, Gumbel-Sigmoid with straight-through hard
  decisions), where the paper uses SkipNet's recurrent gate (see :mod:`skipnet`) trained with SkipNet's
  hybrid RL; the energy term is what this recipe is about;
* the paper trades accuracy against energy with a weight alone; here the MAC-budget loss holds the MAC
  fraction at ``budget`` and the (linear) energy term decides *which* blocks to skip at that cost: at equal MACs,
  a block with more energy per MAC (more weights and feature-map traffic) is pushed closed harder;
* the energy model is the analytic one above, not a measured per-layer energy table;
* gates start open (bias trick), so the converted network reproduces the base network.

Budget: trained and calibrated. ``budget`` (the target fraction of the dense MACs) is the target of the MAC-budget
loss; the energy term, a linear cost with weight ``energy_weight`` (the paper's knob), pulls slightly below it, and
calibration then shifts the keep logit of every gate by one offset (``calibration[0]``) until the mean MAC fraction
on held-out images equals the budget. The energy fraction spent is logged (``energy_fraction``), not targeted.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import ResidualAdapter, Targets, first_conv_in_channels, replace_module, residual_blocks
from dynnet.core import Decision, DynamicModel, LossOutput, Trace, current_trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.gates import PooledMLPGate
from dynnet.losses.energy import EnergyCosts, layer_energy
from dynnet.methods.layer_skip._resnet import SigmoidGatedResidual, gate_logit_knob

__all__ = ["EnergyBlock", "EnergyNet", "EnergyNetConfig"]


@dataclass(frozen=True)
class EnergyNetConfig:
    """Settings of EnergyNet.

    Attributes:
        budget: target mean fraction of the dense MACs per image (gates included): the target of the MAC-budget loss
            and of calibration.
        hidden: hidden width of each gate.
        tau: Gumbel-Sigmoid temperature.
        budget_weight: weight of the MAC-budget loss ``(mean MACs / dense − budget)²``.
        energy_weight: weight of the energy cost ``E / E_dense`` (the paper's trade-off coefficient; it decides which
            blocks are skipped at the budget, and pulls the MAC fraction below it by about
            ``energy_weight / (2 budget_weight)`` before calibration).
        costs: per-operation energies (pJ).
    """

    budget: float = 0.5
    hidden: int = 16
    tau: float = 1.0
    budget_weight: float = 1.0
    energy_weight: float = 0.1
    costs: EnergyCosts = field(default_factory=EnergyCosts)

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if not (self.budget_weight >= 0 and self.energy_weight >= 0):
            raise ValueError(
                f"budget_weight and energy_weight must be >= 0, got {self.budget_weight}, {self.energy_weight}"
            )


class EnergyBlock(SigmoidGatedResidual):
    """A gated residual block that also records its energy (``<name>/energy`` output, Tensor[N] pJ)."""

    def __init__(self, block: nn.Module, adapter: ResidualAdapter, gate: nn.Module, costs: EnergyCosts) -> None:
        super().__init__(block, adapter, gate)
        self.costs = costs

    def body_energy(self, x: Tensor) -> tuple[float, float]:
        """``(body, gate)`` energy in pJ per sample for input Tensor[N, C, H, W]."""
        body_macs = self.cost("body", lambda m, inp: m.body(inp), x)
        gate_macs = self.cost("gate", lambda m, inp: m.gate(inp), x)
        excluded = {id(p) for p in self.gate.parameters()}
        downsample = getattr(self._block, "downsample", None)
        if downsample is not None:  # the shortcut runs whether the block is skipped or not
            excluded |= {id(p) for p in downsample.parameters()}
        weights = sum(p.numel() for p in self.parameters() if id(p) not in excluded)
        in_words = x[0].numel()
        body = layer_energy(body_macs, weights, 2 * in_words, self.costs)
        gate = layer_energy(gate_macs, sum(p.numel() for p in self.gate.parameters()), in_words, self.costs)
        return body, gate

    def _record(self, x: Tensor, d: Decision, executed_body: Tensor | None) -> None:
        super()._record(x, d, executed_body)
        t = current_trace()
        if t is not None:
            body, gate = self.body_energy(x)
            energy = d.hard.double() * body + gate
            t.record_output(f"{self.block_name}/energy", torch.stack([energy, torch.full_like(energy, body + gate)], 1))


class EnergyNet(DynamicModel):
    """Objective: cross-entropy + ``budget_weight`` × MAC-budget loss + ``energy_weight`` × ``E / E_dense``."""

    def budget_knob(self) -> Knob:
        """One offset added to the keep logit of every gate."""
        return gate_logit_knob(self)

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        cfg: EnergyNetConfig = self.config
        task = F.cross_entropy(logits, target)
        b = t.budget_loss(cfg.budget if budget is None else budget)
        recorded = [v for k, v in t.outputs.items() if k.split("#")[0].endswith("/energy")]
        stacked = torch.stack(recorded).sum(0)  # Tensor[N, 2]: executed, dense
        energy = (stacked[:, 0].mean() / stacked[:, 1].detach().mean()).float()
        parts = {"task": float(task.detach()), "budget": float(b.detach()), "energy_fraction": float(energy.detach())}
        return LossOutput(task + cfg.budget_weight * b + cfg.energy_weight * energy, parts)


@recipe(
    "energynet",
    paper="EnergyNet: Energy-Efficient Dynamic Inference (NeurIPS 2018 Workshop CDNNRIA), "
    "https://openreview.net/forum?id=Syxp2bgKoX",
    budget=BudgetPolicy("trained+calibrated", knob="gate logit offset", reachable=(0.1, 1.0),
                        derives="target of the MAC-budget loss = budget (the energy cost keeps its own weight)"),
)  # fmt: skip
def convert(model: nn.Module, config: EnergyNetConfig, targets: Targets = "auto") -> EnergyNet:
    """Put an EnergyNet gate on every target residual block of ``model`` (in place)."""
    for name, block, adapter in residual_blocks(model, targets):
        gate = PooledMLPGate(adapter.in_channels(block), 1, config.hidden, open_index=None)
        new = EnergyBlock(block, adapter, gate, config.costs)
        new.block_name, new.tau = name, config.tau
        replace_module(model, name, new)
    return EnergyNet(model, recipe="energynet", config=copy.copy(config), in_channels=first_conv_in_channels(model))
