"""Runtime Network Routing — Rao, Lu, Lin & Zhou, "Runtime Network Routing for Efficient Image Classification",
IEEE TPAMI 41(10), 2019. https://doi.org/10.1109/TPAMI.2018.2878258

The inner channels of every residual block form ``paths`` parallel, disjoint channel paths (the paper's multi-path
residual networks); at every block an agent routes the sample through one path or through all of them. Routing is
bottom-up, layer by layer, a Markov decision process: a recurrent agent estimates the reward (Q-value) of each
sub-path from the pooled block input and its hidden state, and is trained with reinforcement learning (one-step
Q-learning, epsilon-greedy) with a computation penalty at every block and ``-CE`` at the end. Sparse mode runs only
the chosen path's channels (contiguous slices; samples on the same path are batched).

Departures from the paper:
* the paths are channel slices of the existing pretrained blocks (the paper trains multi-path blocks whose paths
  are separate branches), so a converted network reproduces the base network when every block takes "all paths";
* the agent and the backbone are trained jointly, without replay memory, with a constant epsilon;
* the agent is the RNP-style GRU shared by all blocks (the paper's agent design differs in its feature encoders);
* the penalty is adapted during training so that the MAC fraction approaches the budget (below); the paper fixes it.

Budget: trained and calibrated. ``budget`` is the target fraction of the dense MACs (the agent included). The reward
``penalty`` per unit of kept channels starts at the config's value and follows the budget by dual ascent during
training (as RNP's, :mod:`dynnet.methods.channel.rnp`); calibration adds one offset times each action's kept
fraction to the Q-values (an edit of the shared decoder's bias) until the mean MAC fraction on held-out images
equals the budget. Reachable (declared): 0.55 to 1, for the default ``paths = 2`` (every block on one path costs
about 0.53 of a ResNet-8 and 0.51 of a ResNet-20); more paths reach lower (one of ``P`` paths costs about ``1 / P``
of the blocks), but ``convert`` checks the declared range.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dynnet.convert import Targets
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.methods.channel._agent import QRoutingModel, path_masks
from dynnet.methods.channel.rnp import convert_with_agent

__all__ = ["RuntimeRoutingConfig"]


@dataclass(frozen=True)
class RuntimeRoutingConfig:
    """Settings of Runtime Network Routing.

    Attributes:
        budget: target mean fraction of the dense MACs per image (the agent included): the target the reward's
            penalty follows in training, and the calibration's.
        paths: disjoint channel paths per block (actions: each path alone, or all).
        hidden: GRU width of the agent.
        epsilon: exploration rate in training.
        gamma: discount of the TD targets.
        penalty: initial reward penalty per unit of kept channel fraction at every block (the paper's knob).
        penalty_rate: dual-ascent step of the penalty per training step and unit of MAC fraction above the budget
            (0: the penalty stays fixed, as in the paper).
        q_weight: weight of the Q-learning loss.
        strategy: sparse-mode batch strategy.
    """

    budget: float = 0.75
    paths: int = 2
    hidden: int = 32
    epsilon: float = 0.1
    gamma: float = 0.9
    penalty: float = 0.1
    penalty_rate: float = 0.02
    q_weight: float = 1.0
    strategy: str = "auto"


@recipe(
    "runtime_routing",
    paper="Runtime Network Routing for Efficient Image Classification (TPAMI 2019), doi:10.1109/TPAMI.2018.2878258",
    budget=BudgetPolicy("trained+calibrated", knob="action-value offset", reachable=(0.55, 1.0),
                        derives="reward penalty per kept fraction, adapted by dual ascent toward the budget in "
                        "training"),
)  # fmt: skip
def convert(model: nn.Module, config: RuntimeRoutingConfig, targets: Targets = "auto") -> QRoutingModel:
    """Runtime routing among channel paths on every target residual block (basic or Bottleneck) of a
    ResNet-style ``model`` (in place)."""
    return convert_with_agent(model, config, targets, "runtime_routing", lambda c: path_masks(c, config.paths))
