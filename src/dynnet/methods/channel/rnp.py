"""Runtime Neural Pruning — Lin, Rao, Lu & Zhou, "Runtime Neural Pruning", NeurIPS 2017.
https://papers.nips.cc/paper/2017/hash/a51fb975227d6640e4fe47854476d133-Abstract.html

The inner channels of every residual block are split into ``groups`` equal groups, ordered; a recurrent agent
(per-block encoder of the pooled block input → shared GRU → shared decoder to ``groups`` Q-values) decides block by
block how many groups to keep (action ``a`` keeps the first ``a + 1``). The decision process is a Markov decision
process trained with Q-learning: epsilon-greedy exploration, reward ``-penalty × (kept fraction)`` at every block
and ``-CE`` at the last, one-step TD targets ``r + gamma · max Q'``. The backbone is trained with cross-entropy under
the agent's decisions. Since every sample keeps a prefix of channels, sparse mode slices contiguous weight ranges
and batches samples with the same action together (at most ``groups`` slices per block).

Departures from the paper:
* the agent and the backbone are trained jointly in one objective (the paper alternates between them) and without
  an experience-replay memory;
* the agent reads the pooled input of each residual block and decides that block's inner channels (``conv1``
  outputs = ``conv2`` inputs), where the paper prunes the output channels of every convolution of a VGG network;
* epsilon is constant (``epsilon``) instead of annealed; the decoder starts with a large bias on "keep all" so a
  fresh conversion reproduces the base network;
* ``budget`` is not a hard constraint: as in the paper the trade-off is set by ``penalty``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from dynnet.convert import Targets, first_conv_in_channels
from dynnet.core import RecipeSpec, register_recipe
from dynnet.methods.channel._agent import QAgent, QRoutingModel, nested_group_masks
from dynnet.methods.channel._block import ChannelGatedBlock, convert_blocks

__all__ = ["RNPConfig", "convert_with_agent"]


@dataclass(frozen=True)
class RNPConfig:
    """Settings of RNP.

    Attributes:
        budget: nominal MAC fraction (reported; the trade-off is set by ``penalty``).
        groups: channel groups per block (the number of actions; 4 in the paper).
        hidden: GRU width of the agent.
        epsilon: exploration rate in training.
        gamma: discount of the TD targets.
        penalty: reward penalty per unit of kept channel fraction at every block.
        q_weight: weight of the Q-learning loss in the joint objective.
        strategy: sparse-mode batch strategy.
    """

    budget: float = 0.5
    groups: int = 4
    hidden: int = 32
    epsilon: float = 0.1
    gamma: float = 0.9
    penalty: float = 0.1
    q_weight: float = 1.0
    strategy: str = "auto"


def convert_with_agent(model: nn.Module, config, targets: Targets, recipe: str, table) -> QRoutingModel:
    """Wrap the target blocks, attach a :class:`QAgent` and one action table ``table(C)`` per block."""
    in_channels = first_conv_in_channels(model)
    blocks = convert_blocks(model, targets, lambda n, b, a: ChannelGatedBlock(b, a, None, strategy=config.strategy))
    net = QRoutingModel(model, recipe=recipe, config=copy.copy(config), in_channels=in_channels)
    tables = [table(b.channels) for b in blocks]
    for i, masks in enumerate(tables):
        net.register_buffer(f"masks{i}", masks)
    net.controller = QAgent([b.conv1.in_channels for b in blocks], tables[0].shape[0], config.hidden, config.epsilon)
    return net


def convert(model: nn.Module, config: RNPConfig, targets: Targets = "auto") -> QRoutingModel:
    """RNP on every target basic residual block of ``model`` (in place)."""
    return convert_with_agent(model, config, targets, "rnp", lambda c: nested_group_masks(c, config.groups))


SPEC = register_recipe(
    RecipeSpec(
        name="rnp",
        family="channel",
        config_cls=RNPConfig,
        convert=convert,
        paper="Runtime Neural Pruning (NeurIPS 2017), https://papers.nips.cc/paper/6813-runtime-neural-pruning",
    )
)
