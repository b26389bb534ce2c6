"""EnergyNet — Wang, Nguyen, Zhao, Wang, Lin & Baraniuk, "EnergyNet: Energy-Efficient Dynamic Inference",
NeurIPS 2018 Workshop on Compact Deep Neural Networks. https://openreview.net/forum?id=Syxp2bgKoX

A skip policy over the residual blocks trained with an *energy* cost instead of a MAC or rate target:
each block's energy is ``e_mac · MACs + e_weight · weights + e_activation · feature-map words``
(:func:`dynnet.losses.energy.layer_energy`, Horowitz's 45 nm costs), so a block with many weights (late,
wide stages) is worth more to skip than its MACs alone say. The objective is cross-entropy plus
``energy_weight × (E / E_dense − budget)²`` with ``E`` the energy of the executed blocks and gates.

Departures from the paper:
* gates are feed-forward (pooled features → MLP → one logit, Gumbel-Sigmoid with straight-through hard
  decisions), where the paper uses SkipNet's recurrent gate (see :mod:`skipnet`) trained with SkipNet's
  hybrid RL; the energy term is what this recipe is about;
* the energy budget is a squared distance to ``budget`` (a fraction of the dense energy of the gated
  blocks) rather than a linear penalty, so the trade-off is set by a target like the other recipes;
* the energy model is the analytic one above, not a measured per-layer energy table;
* gates start open (bias trick), so the converted network reproduces the base network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import ResidualAdapter, Targets, first_conv_in_channels, replace_module, residual_blocks
from dynnet.core import Decision, DynamicModel, LossOutput, RecipeSpec, Trace, current_trace, register_recipe
from dynnet.gates import PooledMLPGate
from dynnet.losses.energy import EnergyCosts, energy_budget_loss, layer_energy
from dynnet.methods.layer_skip._resnet import SigmoidGatedResidual

__all__ = ["EnergyBlock", "EnergyNet", "EnergyNetConfig"]


@dataclass(frozen=True)
class EnergyNetConfig:
    """Settings of EnergyNet.

    Attributes:
        budget: target energy of the gated blocks, as a fraction of their dense energy.
        hidden: hidden width of each gate.
        tau: Gumbel-Sigmoid temperature.
        energy_weight: weight of the energy-budget loss.
        costs: per-operation energies (pJ).
    """

    budget: float = 0.5
    hidden: int = 16
    tau: float = 1.0
    energy_weight: float = 2.0
    costs: EnergyCosts = field(default_factory=EnergyCosts)


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
    """Objective: cross-entropy + ``energy_weight`` × energy-budget loss."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        cfg: EnergyNetConfig = self.config
        task = F.cross_entropy(logits, target)
        recorded = [v for k, v in t.outputs.items() if k.split("#")[0].endswith("/energy")]
        stacked = torch.stack(recorded).sum(0)  # Tensor[N, 2]: executed, dense
        dense = float(stacked[:, 1].detach().mean())
        e = energy_budget_loss(stacked[:, 0], dense, cfg.budget if budget is None else budget)
        parts = {
            "task": float(task.detach()),
            "energy": float(e.detach()),
            "energy_fraction": float(stacked[:, 0].detach().mean() / dense),
        }
        return LossOutput(task + cfg.energy_weight * e, parts)


def convert(model: nn.Module, config: EnergyNetConfig, targets: Targets = "auto") -> EnergyNet:
    """Put an EnergyNet gate on every target residual block of ``model`` (in place)."""
    for name, block, adapter in residual_blocks(model, targets):
        gate = PooledMLPGate(adapter.in_channels(block), 1, config.hidden, open_index=None)
        new = EnergyBlock(block, adapter, gate, config.costs)
        new.block_name, new.tau = name, config.tau
        replace_module(model, name, new)
    return EnergyNet(model, recipe="energynet", config=copy.copy(config), in_channels=first_conv_in_channels(model))


SPEC = register_recipe(
    RecipeSpec(
        name="energynet",
        family="layer_skip",
        config_cls=EnergyNetConfig,
        convert=convert,
        paper="EnergyNet: Energy-Efficient Dynamic Inference (NeurIPS 2018 Workshop CDNNRIA), "
        "https://openreview.net/forum?id=Syxp2bgKoX",
    )
)
