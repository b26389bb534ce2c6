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
* the agent is the RNP-style GRU shared by all blocks (the paper's agent design differs in its feature encoders).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dynnet.convert import Targets
from dynnet.core import RecipeSpec, register_recipe
from dynnet.methods.channel._agent import QRoutingModel, path_masks
from dynnet.methods.channel.rnp import convert_with_agent

__all__ = ["RuntimeRoutingConfig"]


@dataclass(frozen=True)
class RuntimeRoutingConfig:
    """Settings of Runtime Network Routing.

    Attributes:
        budget: nominal MAC fraction (reported; the trade-off is set by ``penalty``).
        paths: disjoint channel paths per block (actions: each path alone, or all).
        hidden: GRU width of the agent.
        epsilon: exploration rate in training.
        gamma: discount of the TD targets.
        penalty: reward penalty per unit of kept channel fraction at every block.
        q_weight: weight of the Q-learning loss.
        strategy: sparse-mode batch strategy.
    """

    budget: float = 0.5
    paths: int = 2
    hidden: int = 32
    epsilon: float = 0.1
    gamma: float = 0.9
    penalty: float = 0.1
    q_weight: float = 1.0
    strategy: str = "auto"


def convert(model: nn.Module, config: RuntimeRoutingConfig, targets: Targets = "auto") -> QRoutingModel:
    """Runtime routing among channel paths on every target basic residual block of ``model`` (in place)."""
    return convert_with_agent(model, config, targets, "runtime_routing", lambda c: path_masks(c, config.paths))


SPEC = register_recipe(
    RecipeSpec(
        name="runtime_routing",
        family="channel",
        config_cls=RuntimeRoutingConfig,
        convert=convert,
        paper="Runtime Network Routing for Efficient Image Classification (TPAMI 2019), doi:10.1109/TPAMI.2018.2878258",
    )
)
