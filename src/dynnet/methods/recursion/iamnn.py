"""IamNN — Leroux, Molchanov, Simoens, Dhoedt, Breuel & Kautz, "IamNN: Iterative and Adaptive Mobile Neural
Network for Efficient Image Classification", ICLR 2018 Workshop. https://arxiv.org/abs/1804.10123

Every ResNet stage becomes a transition block (the stage's first block, which may change the resolution
and width) followed by ONE residual block whose weights are shared across iterations, iterated up to
``iterations`` times; ACT halting (Graves 2016) after the transition block and after each iteration decides
per sample when to stop, with the ponder cost ``tau * (N + R)`` as the compute objective. In sparse mode a
sample that halted leaves the batch, so its remaining iterations cost nothing.

This is its own architecture (``reproduces_base=False``): the shared block is initialised from the stage's
second block, so a converted network is *not* the base network; its dense mode is the fully unrolled
iteration (every iteration's MACs count as dense).

Departures from the paper:
* the stage output is the state of the iteration the sample halted at, with Graves's mean-field output used
  only for the halting units' gradient (straight-through), as in :mod:`dynnet.methods.recursion.act`;
* the paper iterates a block that also adapts batch-norm per iteration and prunes channels; we share the
  whole block (its batch norms included) and keep its width;
* halting starts closed (``h ≈ 0.0025``): a fresh model runs every iteration;
* a MAC-budget loss (``budget_weight``) is added to the ponder cost, and a halting logit offset is calibrated after
  training (below).

Budget: trained and calibrated. ``budget`` is the target mean fraction of the dense MACs per image, the dense network
being the fully unrolled one (every iteration; halting units included in the spent MACs). The paper's knob, the time
penalty ``tau`` (``ponder_weight``), is kept as is; the budget adds the MAC-budget loss
``budget_weight * (mean MAC fraction - budget)^2`` and calibration subtracts one offset from the logit of every
halting unit (``calibration[0]``) until the mean MAC fraction on held-out images equals the budget. The reachable
range is from the transition blocks alone (about 0.31 of an unrolled ResNet-20) to every iteration; the declared
range is 0.35-1.0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels, replace_module
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.methods.recursion._halting import HaltingModel, HaltingStage, HaltingUnit, out_channels, stages_of

__all__ = ["IamNN", "IamNNConfig", "IterativeStage"]


@dataclass(frozen=True)
class IamNNConfig:
    """Settings of IamNN.

    Attributes:
        budget: target mean fraction of the dense (fully unrolled) MACs per image, halting units included: the target
            of the MAC-budget loss and of calibration (the halting logit offset).
        iterations: maximal iterations of the shared block per stage; ``None``: the stage's block count - 1
            (so the unrolled network has the base network's depth).
        ponder_weight: Graves's time penalty tau.
        eps: Graves's epsilon.
        budget_weight: weight of the MAC-budget loss (0: the paper's objective, ponder cost only).
    """

    budget: float = 0.5
    iterations: int | None = None
    ponder_weight: float = 0.01
    eps: float = 0.01
    budget_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations!r}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps!r}")


class IterativeStage(HaltingStage):
    """Transition block (child ``0``) then the weight-shared block (child ``shared``) iterated ``iterations`` times."""

    def __init__(
        self, first: nn.Module, shared: nn.Module, channels: int, iterations: int, eps: float, ponder_weight: float
    ):
        super().__init__(nn.ModuleList(HaltingUnit(channels) for _ in range(iterations)), eps, ponder_weight)
        self.add_module("0", first)
        self.shared = shared

    def unit(self, index: int) -> nn.Module:
        return getattr(self, "0") if index == 0 else self.shared


class IamNN(HaltingModel):
    """The converted network: cross-entropy + ponder cost + MAC-budget loss; knob: the halting logit offset."""

    def load_base_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load weights of the original network: each stage's first block into its transition block, its second
        block into the shared block (as at conversion); the stage's later blocks have no place and are left out."""
        stages = [name for name, m in self.net.named_modules() if isinstance(m, IterativeStage)]
        mapped: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            stage = next((s for s in stages if key.startswith(f"{s}.")), None)
            if stage is None:
                mapped[key] = value
                continue
            index, _, rest = key[len(stage) + 1 :].partition(".")
            if index == "0":
                mapped[key] = value
            elif index == "1":
                mapped[f"{stage}.shared.{rest}"] = value
        super().load_base_state_dict(mapped)


@recipe(
    "iamnn",
    paper="IamNN: Iterative and Adaptive Mobile Neural Network for Efficient Image Classification "
    "(ICLR 2018 Workshop), arXiv:1804.10123",
    budget=BudgetPolicy("trained+calibrated", knob="halting logit offset", reachable=(0.35, 1.0),
                        derives="MAC-budget loss target = budget (the paper's time penalty tau is kept as is)"),
    test_base="cifar_resnet20",
    reproduces_base=False,
)  # fmt: skip
def convert(model: nn.Module, config: IamNNConfig, targets: Targets = "auto") -> IamNN:
    """Turn every stage of >= 2 blocks (targets but perhaps the first) into its first block + an iterated
    weight-shared copy of its second."""
    converted = 0
    for stage_name, blocks in stages_of(model, targets):
        first, second = blocks[0], blocks[1]
        iterations = config.iterations or len(blocks) - 1
        new = IterativeStage(
            first, copy.deepcopy(second), out_channels(first), iterations, config.eps, config.ponder_weight
        )
        new.block_name = stage_name
        replace_module(model, stage_name, new)
        converted += 1
    if not converted:
        raise ValueError(
            "iamnn needs stages (nn.Sequential) of at least 2 blocks that are residual blocks but perhaps the first; "
            "none found"
        )
    return IamNN(model, recipe="iamnn", config=copy.copy(config), in_channels=first_conv_in_channels(model))
