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
* the penalty is adapted during training so that the MAC fraction approaches the budget (below); the paper fixes it.

Budget: trained and calibrated. ``budget`` is the target fraction of the dense MACs (the agent included). The
paper's knob, the reward ``penalty`` per unit of kept channels, starts at the config's value and follows the budget
by dual ascent during training (``penalty ← max(0, penalty + penalty_rate · (MAC fraction − budget))``, a buffer of
the model); calibration adds one offset times each action's kept fraction to the Q-values (an edit of the shared
decoder's bias, which the compiled agent step reads) until the mean MAC fraction on held-out images equals the
budget. Reachable (declared): 0.3 to 1; every block keeping one of the four groups costs about 0.29 of a ResNet-8 and
0.26 of a ResNet-20.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from dynnet.convert import Targets, first_conv_in_channels
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.methods.channel._agent import QAgent, QRoutingModel, nested_group_masks
from dynnet.methods.channel._block import ChannelGatedBlock, convert_blocks
from dynnet.methods.channel._resnet import resnet_stages

__all__ = ["RNPConfig", "convert_with_agent"]


@dataclass(frozen=True)
class RNPConfig:
    """Settings of RNP.

    Attributes:
        budget: target mean fraction of the dense MACs per image (the agent included): the target the reward's
            penalty follows in training, and the calibration's.
        groups: channel groups per block (the number of actions; 4 in the paper).
        hidden: GRU width of the agent.
        epsilon: exploration rate in training.
        gamma: discount of the TD targets.
        penalty: initial reward penalty per unit of kept channel fraction at every block (the paper's knob).
        penalty_rate: dual-ascent step of the penalty per training step and unit of MAC fraction above the budget
            (0: the penalty stays fixed, as in the paper).
        q_weight: weight of the Q-learning loss in the joint objective.
        strategy: sparse-mode batch strategy.
    """

    budget: float = 0.5
    groups: int = 4
    hidden: int = 32
    epsilon: float = 0.1
    gamma: float = 0.9
    penalty: float = 0.1
    penalty_rate: float = 0.02
    q_weight: float = 1.0
    strategy: str = "auto"


def convert_with_agent(model: nn.Module, config, targets: Targets, recipe: str, table) -> QRoutingModel:
    """Wrap the target blocks, attach a :class:`QAgent` and one action table ``table(C)`` per block."""
    in_channels = first_conv_in_channels(model)
    resnet_stages(model)  # the agent walks a ResNet's stages: refuse another network now, in one line
    blocks = convert_blocks(model, targets, lambda n, b, a: ChannelGatedBlock(b, a, None, strategy=config.strategy))
    net = QRoutingModel(model, recipe=recipe, config=copy.copy(config), in_channels=in_channels)
    tables = [table(b.channels) for b in blocks]
    for i, masks in enumerate(tables):
        net.register_buffer(f"masks{i}", masks)
    widths = [b.adapter.in_channels(b._block) for b in blocks]
    net.controller = QAgent(widths, tables[0].shape[0], config.hidden, config.epsilon)
    return net


@recipe(
    "rnp",
    paper="Runtime Neural Pruning (NeurIPS 2017), https://papers.nips.cc/paper/6813-runtime-neural-pruning",
    budget=BudgetPolicy("trained+calibrated", knob="action-value offset", reachable=(0.3, 1.0),
                        derives="reward penalty per kept fraction, adapted by dual ascent toward the budget in "
                        "training",
                        # standard profile, 2026-12-07: trained at 0.5 (92.79 %), calibrated to 0.75: 92.51 %
                        transfers=False),
)  # fmt: skip
def convert(model: nn.Module, config: RNPConfig, targets: Targets = "auto") -> QRoutingModel:
    """RNP on every target residual block (basic or Bottleneck) of a ResNet-style ``model`` (in place)."""
    return convert_with_agent(model, config, targets, "rnp", lambda c: nested_group_masks(c, config.groups))
