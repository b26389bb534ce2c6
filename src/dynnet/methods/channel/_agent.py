"""A recurrent Q-learning agent that picks, layer by layer, which channels of each residual block run.

Shared by Runtime Neural Pruning (actions: keep the first ``a`` channel groups) and Runtime Network Routing
(actions: one of several channel paths, or all of them). At block ``l`` the agent pools the block input,
encodes it with a per-block linear layer to a common width, advances a GRU cell whose hidden state is passed
explicitly by :meth:`QRoutingModel.run`, and a shared linear decoder outputs one Q-value per action. Actions are
greedy at inference and epsilon-greedy in training; each action maps to a channel mask through a fixed table.

Objective: cross-entropy for the backbone + ``q_weight`` × the one-step Q-learning loss with rewards
``r_l = -penalty · (kept fraction of block l)`` and, at the last block, ``-CE`` of the sample in addition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.core import Decision, DynamicModel, LossOutput, Trace, current_trace
from dynnet.estimators.q_learning import epsilon_greedy, q_learning_loss
from dynnet.gates import open_bias_
from dynnet.methods.channel._block import ChannelGatedBlock
from dynnet.methods.channel._resnet import Controller, iter_blocks, resnet_head, resnet_stem

__all__ = ["QAgent", "QRoutingModel", "nested_group_masks", "path_masks"]


def nested_group_masks(channels: int, groups: int) -> Tensor:
    """RNP's action table: Tensor[G, C] bool, row ``a`` keeps the first ``a + 1`` of ``G`` equal channel groups."""
    if not 0 < groups <= channels:
        raise ValueError(f"groups must be in [1, {channels}], got {groups}")
    bounds = [round(channels * (a + 1) / groups) for a in range(groups)]
    return torch.arange(channels)[None, :] < torch.tensor(bounds)[:, None]


def path_masks(channels: int, paths: int) -> Tensor:
    """RNR's action table: Tensor[P + 1, C] bool, row ``p < P`` is the ``p``-th of ``P`` disjoint channel paths,
    row ``P`` runs every path."""
    if not 0 < paths <= channels:
        raise ValueError(f"paths must be in [1, {channels}], got {paths}")
    edges = [round(channels * p / paths) for p in range(paths + 1)]
    c = torch.arange(channels)
    rows = [(c >= edges[p]) & (c < edges[p + 1]) for p in range(paths)]
    return torch.stack([*rows, torch.ones(channels, dtype=torch.bool)])


class QAgent(Controller):
    """Recurrent Q-network over blocks.

    Args:
        in_channels: the input width of every gated block, in execution order.
        actions: number of actions (the same for every block).
        hidden: GRU width.
        epsilon: exploration rate in training.
    """

    def __init__(self, in_channels: list[int], actions: int, hidden: int, epsilon: float) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(nn.Linear(c, hidden) for c in in_channels)
        self.rnn = nn.GRUCell(hidden, hidden)
        self.decoder = open_bias_(nn.Linear(hidden, actions), open_index=actions - 1)
        self.hidden = hidden
        self.epsilon = epsilon
        self.block_name = "agent"

    def step(self, x: Tensor, state: Tensor, index: int) -> tuple[Tensor, Tensor]:
        """Q-values Tensor[N, A] and the next state Tensor[N, hidden] for block ``index``'s input Tensor[N, C, H, W]."""
        # Functional calls on the modules' parameters: the same graph as calling the modules, without three
        # nn.Module dispatches per block (a visible share of a batch-1 block's time).
        enc, rnn, dec = self.encoders[index], self.rnn, self.decoder
        z = F.relu(F.linear(x.mean((2, 3)), enc.weight, enc.bias))
        state = torch.gru_cell(z, state, rnn.weight_ih, rnn.weight_hh, rnn.bias_ih, rnn.bias_hh)
        return F.linear(state, dec.weight, dec.bias), state

    def decide(self, x: Tensor, state: Tensor | None, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(q, action, state)`` for block ``index``; ``state`` None at the first block."""
        if state is None:
            state = x.new_zeros(x.shape[0], self.hidden)
        q, state = self.step(x, state, index)
        action = epsilon_greedy(q, self.epsilon if self.training else 0.0)
        t = current_trace()
        if t is not None:
            g = self.cost(f"step{index}", lambda m, inp, s: m.step(inp, s, index)[0], x, state)
            t.record_macs(f"agent/{index}", float(g), batch_size=x.shape[0], minimum=g, maximum=g)
        return q, action, state


class QRoutingModel(DynamicModel):
    """A network whose blocks' channels are chosen by a :class:`QAgent` (attribute ``controller``).

    Attributes (set by the converters): ``action_masks`` — one buffer ``masks{l}`` Tensor[A, C_l] bool per block.
    """

    def masks_of(self, index: int) -> Tensor:
        return getattr(self, f"masks{index}")

    def run(self, x: Tensor) -> Tensor:
        h = resnet_stem(self.net, x)
        state, index = None, 0
        t = current_trace()
        for block in iter_blocks(self.net):
            if not isinstance(block, ChannelGatedBlock):
                h = block(h)
                continue
            out = self.controller(h, state, index)
            if out is None:  # dense mode / static cost probe
                h = block(h)
                index += 1
                continue
            q, action, state = out
            mask = self.masks_of(index).index_select(0, action).to(h.dtype)  # Tensor[N, C]
            if t is not None:
                t.record_output(f"{self.recipe}/q{index}", q)
                t.record_output(f"{self.recipe}/action{index}", action)
            soft = torch.softmax(q, 1) if t is not None else None  # only a trace reads the probabilities
            h = block(h, Decision(hard=mask, soft=soft, granularity="channel"), mask)
            index += 1
        return resnet_head(self.net, h)

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        cfg = self.config
        ce = F.cross_entropy(logits, target, reduction="none")
        steps = sum(1 for k in t.outputs if k.startswith(f"{self.recipe}/q"))
        qs = [t.outputs[f"{self.recipe}/q{i}"] for i in range(steps)]
        actions = [t.outputs[f"{self.recipe}/action{i}"] for i in range(steps)]
        rewards = []
        for i, a in enumerate(actions):
            kept = self.masks_of(i).float().mean(1).index_select(0, a)
            rewards.append(-cfg.penalty * kept)
        rewards[-1] = rewards[-1] - ce.detach()
        q_loss = q_learning_loss(qs, actions, rewards, cfg.gamma)
        task = ce.mean()
        total = task + cfg.q_weight * q_loss
        return LossOutput(total, {"task": float(task.detach()), "q": float(q_loss.detach())})
