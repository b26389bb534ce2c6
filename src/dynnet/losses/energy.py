"""An energy model of a layer and the energy-budget loss (EnergyNet's energy cost term).

Energy per inference of a piece of network = ``e_mac · MACs + e_weight · weights + e_activation ·
activations``: arithmetic, weights fetched from off-chip memory, and feature maps moved through on-chip
memory. Default costs are the 45 nm figures of Horowitz, "Computing's Energy Problem (and what we can do
about it)", ISSCC 2014 (32-bit float: multiply 3.7 pJ + add 0.9 pJ; 32-bit DRAM read 640 pJ; 32-bit read of
a 32 KB SRAM 5 pJ), the model EnergyNet and Eyeriss-style estimates build on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["EnergyCosts", "energy_budget_loss", "layer_energy"]


@dataclass(frozen=True)
class EnergyCosts:
    """Energy of one operation, in picojoules.

    Attributes:
        mac: one 32-bit floating-point multiply-add.
        weight: one 32-bit weight read from DRAM (weights are fetched once per inference at batch 1).
        activation: one 32-bit feature-map word read or written in on-chip SRAM.
    """

    mac: float = 4.6
    weight: float = 640.0
    activation: float = 5.0


def layer_energy(macs: float, weights: float, activations: float, costs: EnergyCosts = EnergyCosts()) -> float:
    """Energy (pJ) of one inference of a layer: ``mac · macs + weight · weights + activation · activations``.

    Args:
        macs: multiply-adds per sample.
        weights: parameters read.
        activations: feature-map words read and written (input + output elements per sample).
        costs: per-operation energies.
    """
    if min(macs, weights, activations) < 0:
        raise ValueError("macs, weights and activations must be >= 0")
    return costs.mac * macs + costs.weight * weights + costs.activation * activations


def energy_budget_loss(energy: Tensor, dense_energy: float, target: float) -> Tensor:
    """``(mean_n energy_n / dense_energy - target)^2`` for Tensor[N] per-sample energies (float32 scalar).

    Args:
        energy: Tensor[N] per-sample energy of the gated parts (differentiable through the decisions).
        dense_energy: energy of the same parts when everything runs.
        target: the energy budget as a fraction of ``dense_energy``, in (0, 1].
    """
    if dense_energy <= 0:
        raise ValueError(f"dense_energy must be positive, got {dense_energy!r}")
    return ((energy.mean() / dense_energy).to(torch.float32) - target) ** 2
