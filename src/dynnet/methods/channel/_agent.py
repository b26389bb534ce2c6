"""A recurrent Q-learning agent that picks, layer by layer, which channels of each residual block run.

Shared by Runtime Neural Pruning (actions: keep the first ``a`` channel groups) and Runtime Network Routing
(actions: one of several channel paths, or all of them). At block ``l`` the agent pools the block input,
encodes it with a per-block linear layer to a common width, advances a GRU cell whose hidden state is passed
explicitly by :meth:`QRoutingModel.run`, and a shared linear decoder outputs one Q-value per action. Actions are
greedy at inference and epsilon-greedy in training; each action maps to a channel mask through a fixed table.

Objective: cross-entropy for the backbone + ``q_weight`` × the one-step Q-learning loss with rewards
``r_l = -penalty · (kept fraction of block l)`` and, at the last block, ``-CE`` of the sample in addition.

Budget (the target fraction of the dense MACs, agent included): the reward's ``penalty`` is a buffer of the model,
started at the config's ``penalty`` and adapted during training by dual ascent,
``penalty ← max(0, penalty + penalty_rate · (mean MAC fraction − budget))``, so that training settles where the
batch's MAC fraction is the budget (``penalty_rate = 0``: the paper's fixed penalty). Calibration adds
``offset · c_a`` to the Q-value of every action ``a``, with ``c_a`` the action's kept fraction of the channels
(an edit of the shared decoder's bias, which the compiled agent step reads too; the value is in ``calibration[0]``):
the greedy action's cost grows with the offset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.blocks import DecisionMaker
from dynnet.core import Decision, DynamicModel, LossOutput, Trace, current_trace
from dynnet.core.budget import Knob
from dynnet.core.cache import structure_generation, version_key
from dynnet.estimators.q_learning import epsilon_greedy, q_learning_loss
from dynnet.gates import open_bias_
from dynnet.kernels import native
from dynnet.kernels.channel import block_pair_macs
from dynnet.methods.channel._block import ChannelGatedBlock
from dynnet.methods.channel._resnet import (
    block_compiled_ok,
    compiled_loop_ok,
    iter_blocks,
    resnet_head,
    resnet_stem,
)

__all__ = ["QAgent", "QRoutingModel", "nested_group_masks", "path_masks"]


def _register_agent_rule() -> None:
    """The MAC rules of ``torch.ops.dynnet.agent_step`` — the encoder, the GRU cell's two products and the decoder
    (``J·C + 2·3J·J + A·J``), as the counter counts the Python step's ``linear`` / ``gru_cell`` products — and of
    ``routed_pair3x3`` (the step, the kept channels' pair and the projection shortcut)."""
    from dynnet.macs import MAC_RULES, register_mac_rule

    op, routed = torch.ops.dynnet.agent_step, torch.ops.dynnet.routed_pair3x3
    if op in MAC_RULES:
        return

    @register_mac_rule(op)
    def _rule(args: tuple, kwargs: dict, out: object) -> int:
        enc_w, w_ih, w_hh, dec_w = args[1], args[3], args[4], args[7]
        return enc_w.numel() + w_ih.numel() + w_hh.numel() + dec_w.numel()

    @register_mac_rule(routed)
    def _routed_rule(args: tuple, kwargs: dict, out: object) -> int:
        x, enc_w, w_ih, w_hh, dec_w, w2 = args[0], args[2], args[4], args[5], args[8], args[13]
        y, _, kept = out  # type: ignore[misc]
        shortcut = args[18] if len(args) > 18 else kwargs.get("shortcut_w")
        agent = enc_w.numel() + w_ih.numel() + w_hh.numel() + dec_w.numel()
        return agent + block_pair_macs(x, w2, y, int(kept), shortcut)


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


class QAgent(DecisionMaker):
    """Recurrent Q-network over blocks.

    Args:
        in_channels: the input width of every gated block, in execution order.
        actions: number of actions (the same for every block).
        hidden: GRU width.
        epsilon: exploration rate in training.
    """

    granularity = "channel"

    def __init__(self, in_channels: list[int], actions: int, hidden: int, epsilon: float) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(nn.Linear(c, hidden) for c in in_channels)
        self.rnn = nn.GRUCell(hidden, hidden)
        self.decoder = open_bias_(nn.Linear(hidden, actions), open_index=actions - 1)
        self.hidden = hidden
        self.epsilon = epsilon
        self.block_name = "agent"
        self._native: tuple | None = None  # (structure generation, per-block compiled step operands or None)

    def step(self, x: Tensor, state: Tensor, index: int) -> tuple[Tensor, Tensor]:
        """Q-values Tensor[N, A] and the next state Tensor[N, hidden] for block ``index``'s input Tensor[N, C, H, W]."""
        # Functional calls on the modules' parameters: the same graph as calling the modules, without three
        # nn.Module dispatches per block (a visible share of a batch-1 block's time).
        enc, rnn, dec = self.encoders[index], self.rnn, self.decoder
        z = F.relu(F.linear(x.mean((2, 3)), enc.weight, enc.bias))
        state = torch.gru_cell(z, state, rnn.weight_ih, rnn.weight_hh, rnn.bias_ih, rnn.bias_hh)
        return F.linear(state, dec.weight, dec.bias), state

    def native_step(self, x: Tensor, state: Tensor | None, index: int) -> tuple[Tensor, int, Tensor] | None:
        """``(q, action, state)`` of a greedy inference step on the compiled kernel (``torch.ops.dynnet.agent_step``:
        pooling, encoder, GRU cell, decoder and argmax in one call), or ``None`` when it does not apply
        (:func:`~dynnet.methods.channel._resnet.compiled_loop_ok`: not in sparse eval mode, hooks, gradients, not one
        float32 CPU sample, no extension, tracing)."""
        if not compiled_loop_ok(x, self):  # the controller's module call (and its hooks) is bypassed
            return None
        operands = self._native_operands(index)
        if operands is None:
            return None
        op, args = operands
        if state is None:
            state = x.new_zeros(1, self.hidden)
        q, state, action = op(x.contiguous(), *args, state)
        return q, action, state

    def _native_operands(self, index: int) -> tuple[object, tuple] | None:
        """The compiled step op and block ``index``'s parameters, cached until a module's parameters or submodules
        are replaced (:func:`~dynnet.core.cache.structure_generation`; in-place edits reach the same tensors)."""
        cache = self._native
        if cache is None or cache[0] != structure_generation():
            ext = native.load(warn=False)
            ops = None
            rnn, dec = self.rnn, self.decoder
            shared = (rnn.weight_ih, rnn.weight_hh, rnn.bias_ih, rnn.bias_hh, dec.weight, dec.bias)
            per_block = [(enc.weight, enc.bias) for enc in self.encoders]
            tensors = [*shared, *(t for pair in per_block for t in pair)]
            if ext is not None and all(
                t is not None and t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in tensors
            ):
                w_ih, w_hh, b_ih, b_hh, dw, db = shared
                ops = [(torch.ops.dynnet.agent_step, (ew, eb, w_ih, w_hh, b_ih, b_hh, dw, db)) for ew, eb in per_block]
                _register_agent_rule()
            cache = self._native = (structure_generation(), ops)
        return None if cache[1] is None else cache[1][index]

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_native"] = None  # holds dispatcher ops; rebuilt on use
        return state

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

    Buffers:
        penalty: the reward's penalty per unit of kept channel fraction (0-dim float64), adapted during training so
            that the MAC fraction approaches the budget (see the module docstring).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("penalty", torch.tensor(float(self.config.penalty), dtype=torch.float64))

    def action_costs(self) -> list[float]:
        """Each action's kept fraction of the inner channels, averaged over the blocks."""
        tables = [self.masks_of(i).float().mean(1) for i in range(self.gated_blocks())]
        return torch.stack(tables).mean(0).tolist()

    def gated_blocks(self) -> int:
        """The number of blocks the agent decides for."""
        return len(self.controller.encoders)

    def budget_knob(self) -> Knob:
        """One offset times each action's kept fraction added to the Q-values (the shared decoder's bias)."""
        bias = self.controller.decoder.bias
        entries = [(bias, a, cost) for a, cost in enumerate(self.action_costs())]
        return self.logit_shift_knob(entries, lo=-100.0, hi=100.0)

    def masks_of(self, index: int) -> Tensor:
        return getattr(self, f"masks{index}")

    def _float_masks(self, index: int) -> tuple[Tensor, list[Tensor]]:
        """Block ``index``'s action table as float32 Tensor[A, C] and as its rows Tensor[1, C], cached while the
        table is unedited and no module's buffers are replaced (the batch-1 loops index them)."""
        caches = self.__dict__.setdefault("_masks_cache", {})
        cached = caches.get(index)
        if cached is not None and cached[0] == structure_generation() and version_key(cached[1]) == cached[2]:
            return cached[3]
        table = self.masks_of(index)
        floats = table.to(torch.float32).contiguous()
        value = (floats, [r.unsqueeze(0) for r in floats])
        caches[index] = (structure_generation(), table, version_key(table), value)
        return value

    def _run_compiled(self, x: Tensor) -> Tensor | None:
        """Batch-1 inference without a trace as compiled calls only: per block one ``routed_pair3x3`` (the agent's
        step, its state updated in place, then the block with the chosen action's channels and its shortcut), with
        no module call or decision object in between; ``None`` (nothing computed) when the agent or a block is not
        in sparse eval mode, has hooks, or has no compiled form, or the input is not one float32 CPU sample."""
        ctrl = self.controller
        if not compiled_loop_ok(x, ctrl):
            return None
        steps: list[tuple] = []  # (block, None, None) for an ungated block, else (block, plan, step operands)
        gated = 0
        for block in iter_blocks(self.net):
            if not isinstance(block, ChannelGatedBlock):
                steps.append((block, None, None))
                continue
            if not block_compiled_ok(block):
                return None
            operands, plan = ctrl._native_operands(gated), block.valid_plan()
            gated += 1
            if operands is None or plan is None:
                return None
            steps.append((block, plan, operands))
        h = resnet_stem(self.net, x)
        state, index = h.new_zeros(1, ctrl.hidden), 0  # updated in place by every step
        routed = torch.ops.dynnet.routed_pair3x3 if native.observed() else native.direct("routed_pair3x3")
        for block, plan, operands in steps:
            if plan is None:
                h = block(h)
                continue
            args = operands[1]
            table = self._float_masks(index)[0]
            h = h.contiguous()
            weights, projection = plan[3], plan[5]
            if projection is not None:  # the agent's step, the block and its projection shortcut in one call
                h = routed(h, state, *args, table, *weights, None, True, *projection)[0]
            else:
                residual = h if plan[6] else block.shortcut(h).contiguous()
                h = routed(h, state, *args, table, *weights, residual, True, None, None)[0]
            index += 1
        return resnet_head(self.net, h)

    def run(self, x: Tensor) -> Tensor:
        t = current_trace()
        if t is None:
            out = self._run_compiled(x)
            if out is not None:
                return out
        h = resnet_stem(self.net, x)
        state, index = None, 0
        for block in iter_blocks(self.net):
            if not isinstance(block, ChannelGatedBlock):
                h = block(h)
                continue
            fast = None if t is not None else self.controller.native_step(h, state, index)
            if fast is not None:  # batch-1 inference: the agent step and then the block, each one compiled call
                q, action, state = fast
                mask = self._float_masks(index)[1][action]  # Tensor[1, C]
                h = block(h, Decision(hard=mask, soft=None, granularity="channel"), mask)
                index += 1
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
        budget = cfg.budget if budget is None else budget
        ce = F.cross_entropy(logits, target, reduction="none")
        if self.training and cfg.penalty_rate:  # dual ascent: the penalty rises while the batch spends too much
            excess = float(t.mac_fraction().detach().mean()) - budget
            with torch.no_grad():
                self.penalty.copy_((self.penalty + cfg.penalty_rate * excess).clamp_min(0.0))
        penalty = float(self.penalty)
        steps = sum(1 for k in t.outputs if k.startswith(f"{self.recipe}/q"))
        qs = [t.outputs[f"{self.recipe}/q{i}"] for i in range(steps)]
        actions = [t.outputs[f"{self.recipe}/action{i}"] for i in range(steps)]
        rewards = []
        for i, a in enumerate(actions):
            kept = self.masks_of(i).float().mean(1).index_select(0, a)
            rewards.append(-penalty * kept)
        rewards[-1] = rewards[-1] - ce.detach()
        q_loss = q_learning_loss(qs, actions, rewards, cfg.gamma)
        task = ce.mean()
        total = task + cfg.q_weight * q_loss
        return LossOutput(total, {"task": float(task.detach()), "q": float(q_loss.detach()), "penalty": penalty})
