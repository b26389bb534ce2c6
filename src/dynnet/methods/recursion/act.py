"""ACT — Graves, "Adaptive Computation Time for Recurrent Neural Networks", arXiv 2016,
https://arxiv.org/abs/1603.08983, applied to the residual blocks of each ResNet stage as in
Figurnov et al., "Spatially Adaptive Computation Time for Residual Networks", CVPR 2017 (arXiv:1612.02297).

Within every stage (``layer1``, ``layer2``, ...) the residual blocks are the units of ACT: after each block
but the last, a halting unit (global average pool → linear → sigmoid) outputs ``h_n``; a sample stops at the
first block where ``sum h >= 1 - eps`` and skips the rest of the stage. The objective is cross-entropy plus
Graves's ponder cost ``tau * mean(N + R)`` per stage. In sparse mode samples that halted leave the batch, so
the executed MACs shrink with every halted sample.

Departures from the papers:
* the stage output is the state of the block the sample halted at (forward), with Graves's mean-field
  output ``sum_n p_n x_n`` used only for the gradient of the halting units (straight-through); the papers
  use the mean-field output in the forward pass too. This makes open halting (``h ≈ 0``) reproduce the base
  network exactly and sparse execution equal masked execution;
* the units are the stage's own blocks (per-block weights); the weight-shared variant is :mod:`iamnn`;
* halting starts closed (``h ≈ 0.0025``), so the converted network runs every block before training;
* a MAC-budget loss (``budget_weight``) is added to Graves's ponder cost, and a halting logit offset is calibrated
  after training (below); the paper controls compute with the time penalty ``tau`` only.

Budget: trained and calibrated. ``budget`` is the target mean fraction of the dense MACs per image (the halting
units included). The paper has no budget: its knob is the time penalty ``tau`` (``ponder_weight``), which trades
accuracy for compute at no fixed rate, so it is kept as is; the budget adds the MAC-budget loss
``budget_weight * (mean MAC fraction - budget)^2`` (the "unit ran" indicators are straight-through, with Graves's
mean-field gradient), and calibration subtracts one offset from the logit of every halting unit
(``calibration[0]``) until the mean MAC fraction on held-out images equals the budget. The reachable range is from
the first block of every stage (about 0.31 of ResNet-20; less on deeper ResNets) to every block; the declared
range is 0.35-1.0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from dynnet.convert import Targets, first_conv_in_channels, replace_module
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.methods.recursion._halting import HaltingModel, HaltingStage, HaltingUnit, out_channels, stages_of

__all__ = ["ACT", "ACTConfig", "ACTStage"]


@dataclass(frozen=True)
class ACTConfig:
    """Settings of ACT.

    Attributes:
        budget: target mean fraction of the dense MACs per image (halting units included): the target of the
            MAC-budget loss and of calibration (the halting logit offset).
        ponder_weight: Graves's time penalty tau (weight of the ponder cost ``N + R`` of every stage).
        eps: Graves's epsilon (a sample halts when its cumulated ``h`` reaches ``1 - eps``).
        budget_weight: weight of the MAC-budget loss (0: the paper's objective, ponder cost only).
    """

    budget: float = 0.5
    ponder_weight: float = 0.01
    eps: float = 0.01
    budget_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps!r}")
        if not (self.ponder_weight >= 0 and self.budget_weight >= 0):
            raise ValueError(
                f"ponder_weight and budget_weight must be >= 0, got {self.ponder_weight}, {self.budget_weight}"
            )


class ACTStage(HaltingStage):
    """A stage (sequence of blocks, children named ``0..L-1`` like the original ``nn.Sequential``) with halting."""

    granularity = "layer"

    def __init__(self, blocks: list[nn.Module], channels: list[int], eps: float, ponder_weight: float) -> None:
        super().__init__(nn.ModuleList(HaltingUnit(c) for c in channels[:-1]), eps, ponder_weight)
        for i, block in enumerate(blocks):
            self.add_module(str(i), block)

    def unit(self, index: int) -> nn.Module:
        return getattr(self, str(index))


class ACT(HaltingModel):
    """The converted network: cross-entropy + ponder cost + MAC-budget loss; knob: the halting logit offset."""


@recipe(
    "act",
    paper="Adaptive Computation Time for Recurrent Neural Networks (arXiv 2016), arXiv:1603.08983",
    budget=BudgetPolicy("trained+calibrated", knob="halting logit offset", reachable=(0.35, 1.0),
                        derives="MAC-budget loss target = budget (the paper's time penalty tau is kept as is)"),
    test_base="cifar_resnet20",
)  # fmt: skip
def convert(model: nn.Module, config: ACTConfig, targets: Targets = "auto") -> ACT:
    """Put ACT halting on every stage of ``model`` of >= 2 blocks, all targets but perhaps the first (which always
    runs)."""
    converted = 0
    for stage_name, blocks in stages_of(model, targets):
        channels = [out_channels(b) for b in blocks]
        new = ACTStage(blocks, channels, config.eps, config.ponder_weight)
        new.block_name = stage_name
        replace_module(model, stage_name, new)
        converted += 1
    if not converted:
        raise ValueError(
            "act needs stages (nn.Sequential) of at least 2 blocks that are residual blocks but perhaps the first; "
            "none found"
        )
    return ACT(model, recipe="act", config=copy.copy(config), in_channels=first_conv_in_channels(model))
