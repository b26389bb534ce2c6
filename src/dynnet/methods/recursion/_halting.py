"""`HaltingStage`: a stage of units run one after the other until each sample halts (ACT-style).

Shared by :mod:`act` (distinct units: the stage's residual blocks) and :mod:`iamnn` (a transition block
followed by one weight-shared block iterated). After every unit but the last, a halting unit (global
average pool → linear → sigmoid) gives ``h_n``; a sample halts by Graves's rule
(:func:`dynnet.estimators.ponder.halts`) and its stage output is the state of the unit it halted at.

* masked: every unit runs on the whole batch; the output is ``sum_n sel_n x_n`` with the straight-through
  selection of :func:`~dynnet.estimators.ponder.straight_through_select` (exactly the halting unit's state,
  Graves's mean-field gradient for the halting units); the ponder cost ``N + R`` goes to the trace.
* sparse: samples that halted leave the batch (``index_select``); the ones still running continue, so a
  unit nobody reaches costs nothing and the first units run without any gather when nobody halted yet.
* dense: all units, no halting unit evaluated.

Budget (both recipes): the MAC-budget loss ``(mean MAC fraction - budget)^2`` reaches the halting units through a
straight-through "unit ran" indicator (its forward value is exact, its gradient Graves's mean-field one), and
:meth:`HaltingModel.budget_knob` — one offset subtracted from every halting unit's logit (kept in the units' biases
and ``calibration[0]``) — moves the halting step of every sample monotonically, which :func:`dynnet.calibrate`
bisects on held-out images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, residual_blocks
from dynnet.core import Decision, DynamicBlock, DynamicModel, LossOutput, Trace, current_trace
from dynnet.core.budget import Knob, LogitShift
from dynnet.estimators.ponder import act_weights, halts, ponder_cost, straight_through_select
from dynnet.gates import open_bias_

__all__ = ["HaltingModel", "HaltingStage", "HaltingUnit", "out_channels", "stages_of"]


class HaltingUnit(nn.Module):
    """Tensor[N, C, H, W] → halting probability Tensor[N]: global average pool → linear → sigmoid.

    Starts with ``h ≈ 0.0025`` (never halts before the last unit), so a fresh stage runs every unit.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = open_bias_(nn.Linear(channels, 1), logit=-6.0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.fc(self.pool(x).flatten(1))).squeeze(1)


class HaltingStage(DynamicBlock):
    """Units ``0..L-1`` with a halting unit after each unit but the last (names them ``halting.<n>``).

    Subclasses define :meth:`unit`, :attr:`num_units` and register the unit modules.

    Args:
        halting: one :class:`HaltingUnit` per unit but the last.
        eps: Graves's epsilon.
        ponder_weight: Graves's time penalty tau; in training ``ponder_weight * mean(N + R)`` is added to the
            trace's auxiliary losses (the per-sample ponder cost is also recorded as output ``<stage>/ponder``).
    """

    granularity = "recursion"

    def __init__(self, halting: nn.ModuleList, eps: float, ponder_weight: float) -> None:
        super().__init__()
        self.halting = halting
        self.eps = eps
        self.ponder_weight = ponder_weight

    @property
    def num_units(self) -> int:
        return len(self.halting) + 1

    def unit(self, index: int) -> nn.Module:
        raise NotImplementedError

    def unit_dense(self, index: int) -> bool:
        """Whether unit ``index`` is part of the dense (static) network — its cost counts in ``dense``."""
        return True

    # -- modes ----------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor) -> Tensor:
        for i in range(self.num_units):
            x = self.unit(i)(x)
        return x

    def forward_masked(self, x: Tensor) -> Tensor:
        states, hs, inputs = [], [], []
        for i in range(self.num_units):
            inputs.append(x)
            x = self.unit(i)(x)
            states.append(x)
            if i < self.num_units - 1:
                hs.append(self.halting[i](x))
        n = x.shape[0]
        h = torch.stack([*hs, x.new_ones(n)], 1)
        act = act_weights(h, self.eps)
        select = straight_through_select(act.weights, act.steps).to(x.dtype)
        out = sum(select[:, i].view(-1, 1, 1, 1) * s for i, s in enumerate(states))
        # Whether each unit ran, straight-through: exactly ``act.ran`` in the forward pass (1 minus the one-hot
        # selection of the units before), with the mean-field gradient of Graves's weights, so that a MAC-budget
        # loss on the recorded MACs reaches the halting units (d ran_i / d h_n = -1 for n < i <= N).
        ran = 1.0 - (select.cumsum(1) - select)
        self._record(inputs, states, ran, act.steps, act.remainder, executed=None)
        return out

    def forward_sparse(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        out: Tensor | None = None
        idx = torch.arange(n, device=x.device)
        cumulative = x.new_zeros(n)
        ran = torch.zeros(n, self.num_units, dtype=x.dtype, device=x.device)
        steps = torch.full((n,), self.num_units, dtype=torch.long, device=x.device)
        remainder = x.new_zeros(n)
        inputs, states = [], []
        for i in range(self.num_units):
            ran[idx, i] = 1
            inputs.append(x)
            x = self.unit(i)(x)
            states.append(x)
            if out is None:
                out = x.new_empty((n, *x.shape[1:]))
            if i == self.num_units - 1:
                out[idx] = x
                remainder[idx] = 1.0 - cumulative[idx]
                break
            h = self.halting[i](x)
            stop = halts(cumulative[idx], h, self.eps)
            if bool(stop.any()):
                done = idx[stop]
                out[done] = x[stop]
                remainder[done] = 1.0 - cumulative[done]
                steps[done] = i + 1
                keep = ~stop
                cumulative[idx[keep]] = cumulative[idx[keep]] + h[keep]
                idx = idx[keep]
                if idx.numel() == 0:
                    break
                x = x[keep]
            else:
                cumulative[idx] = cumulative[idx] + h
        assert out is not None
        self._record(inputs, states, ran, steps, remainder, executed=ran)
        return out

    # -- bookkeeping ----------------------------------------------------------------------------
    def _record(
        self,
        inputs: list[Tensor],
        states: list[Tensor],
        ran: Tensor,
        steps: Tensor,
        remainder: Tensor,
        executed: Tensor | None,
    ) -> None:
        t = current_trace()
        if t is None:
            return
        n = ran.shape[0]
        rho = ponder_cost(steps, remainder)
        t.record_output(f"{self.block_name}/ponder", rho)
        if self.training and self.ponder_weight:
            t.add_loss("ponder", self.ponder_weight * rho.float().mean())
        for i in range(self.num_units):
            # Units nobody reached still need their cost (for the bounds): after unit 0 every shape is the same.
            x = inputs[i] if i < len(inputs) else states[-1]
            unit_cost = self.cost(f"unit{i}", lambda m, inp, k=i: m.unit(k)(inp), x)
            z = ran[:, i].double()
            ex = torch.full((n,), float(unit_cost), dtype=torch.float64) if executed is None else z * unit_cost
            dense = unit_cost if self.unit_dense(i) else 0.0
            lo = unit_cost if i == 0 else 0.0
            t.record_macs(
                f"{self.block_name}/unit{i}", z * unit_cost, executed=ex, minimum=lo, maximum=unit_cost, dense=dense
            )
            if i > 0:
                t.record_decision(f"{self.block_name}/unit{i}", Decision(ran[:, i], None, self.granularity))
            if i < self.num_units - 1:
                s = states[min(i, len(states) - 1)]
                g = self.cost(f"halting{i}", lambda m, inp, k=i: m.halting[k](inp), s)
                ex_g = torch.full((n,), float(g), dtype=torch.float64) if executed is None else z.detach() * g
                lo_g = g if i == 0 else 0.0
                t.record_macs(f"{self.block_name}/halting{i}", z * g, executed=ex_g, minimum=lo_g, maximum=g)


class HaltingModel(DynamicModel):
    """A network with halting stages; objective: cross-entropy + ponder cost + MAC-budget loss.

    Its config has ``budget`` (target mean fraction of the dense MACs) and ``budget_weight`` (weight of the
    MAC-budget loss ``(mean MAC fraction - budget)^2``; 0 leaves the papers' objective, ponder cost only).
    """

    def budget_knob(self) -> Knob:
        """One offset subtracted from the logit of every halting unit: the larger, the later samples halt."""
        entries = [(unit.fc.bias, None, -1.0) for _, stage in self.blocks() for unit in stage.halting]
        return LogitShift(self.calibration[0], entries).knob(name="halting logit offset")

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        task = F.cross_entropy(logits, target)
        total, parts = task, {"task": float(task.detach())}
        if "ponder" in t.losses:
            total = total + t.losses["ponder"]
            parts["ponder"] = float(t.losses["ponder"].detach())
        weight = getattr(self.config, "budget_weight", 0.0)
        if weight:
            b = t.budget_loss(self.config.budget if budget is None else budget)
            total, parts["budget"] = total + weight * b, float(b.detach())
        return LossOutput(total, parts)


def stages_of(model: nn.Module, targets: Targets) -> list[tuple[str, list[nn.Module]]]:
    """The stages halting can run: every ``nn.Sequential`` of at least 2 children that are all target residual blocks
    but perhaps the first (a stage's transition block that changes the width or resolution without a shortcut, as in
    EfficientNet and MobileNetV3, which always runs), with its children in order."""
    targets_by_parent: dict[str, set[int]] = {}
    for name, block, _ in residual_blocks(model, targets):
        parent, _, _ = name.rpartition(".")
        if parent and isinstance(model.get_submodule(parent), nn.Sequential):
            targets_by_parent.setdefault(parent, set()).add(id(block))
    stages = []
    for parent, ids in targets_by_parent.items():
        children = list(model.get_submodule(parent).children())
        if len(children) >= 2 and all(id(c) in ids for c in children[1:]):
            stages.append((parent, children))
    return stages


def out_channels(block: nn.Module) -> int:
    """Output channels of a block: its last convolution's (a projection shortcut, a Bottleneck's ``conv3``, an
    inverted residual's projection; not the widest, which in an inverted residual is the expansion)."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"cannot find the output channels of {type(block).__name__}: it has no Conv2d")
    return convs[-1].out_channels
