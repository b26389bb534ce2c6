"""Dual Dynamic Inference — Wang, Shen, Hu, Xu, Nguyen, Baraniuk, Wang & Lin, "Dual Dynamic Inference: Enabling
More Efficient, Adaptive and Controllable Deep Inference", IEEE JSTSP 14(4), 2020. https://arxiv.org/abs/1907.04523

Two mechanisms in one network:

* **input-dependent** (the paper's IADI): a gate before every residual block skips it per input
  (pooled features → MLP → one logit, Gumbel-Sigmoid with straight-through hard decisions, MAC-budget
  loss towards ``budget``);
* **resource-dependent** (RADI, "anytime" inference): an exit classifier after every stage but the last.
  With a hard per-sample budget ``resource_budget`` (a fraction of the dense network's MACs, set at
  inference with :meth:`DualDynamicInference.set_resource_budget`), a sample stops at the last exit it
  can reach without its MACs exceeding the budget: after stage ``k`` it continues only if its MACs so far
  plus the dense cost of stage ``k+1`` and of the next classifier fit. Because the skip gates are
  input-dependent, so are the exits: easy inputs that skipped blocks reach deeper exits.

Training (masked mode, no resource budget): cross-entropy of the final classifier + ``exit_weight`` ×
the cross-entropy of every exit (so every exit is usable at any budget) + ``budget_weight`` × MAC-budget
loss. In sparse mode samples that exit leave the batch (compaction), skipped blocks are not run, and a
stage nobody reaches costs nothing.

Departures from the paper:
* layer-wise skipping only (the paper's MGL2S also skips channel groups; see the channel family);
* the paper's skip gates are trained with SkipNet-style hybrid RL and an energy-aware loss; we use
  Gumbel-Sigmoid and the MAC-budget loss (see :mod:`skipnet` and :mod:`energynet` for those);
* the resource rule uses the dense MACs of the next stage (its gates excluded) as its worst case;
* gates start open and ``resource_budget`` defaults to ``None`` (no exit), so a converted network
  reproduces the base network.

Budget: trained and calibrated. ``budget`` (the target mean fraction of the dense MACs per image) is the target of
the skip gates' MAC-budget loss; calibration then shifts the keep logit of every skip gate by one offset
(``calibration[0]``) until the mean MAC fraction on held-out images equals the budget, measured with the exits as
they are (``resource_budget`` in effect, if set). ``resource_budget`` is the paper's other, per-sample knob: a hard
cap on each image's MACs chosen at inference, not derived from ``budget``; set it before calibrating.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.blocks import DecisionMaker
from dynnet.convert import (
    Targets,
    first_conv_in_channels,
    network_layout,
    num_classes_of,
    replace_module,
    residual_blocks,
)
from dynnet.core import Decision, DynamicModel, LossOutput, Trace, current_trace, probe_macs, trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.gates import PooledMLPGate
from dynnet.methods.layer_skip._resnet import SigmoidGatedResidual, gate_logit_knob

__all__ = ["DualDynamicInference", "DualDynamicInferenceConfig", "ExitHead"]


@dataclass(frozen=True)
class DualDynamicInferenceConfig:
    """Settings of Dual Dynamic Inference.

    Attributes:
        budget: target mean fraction of the dense MACs per image (gates and exits included): the target of the skip
            gates' MAC-budget loss and of calibration.
        resource_budget: hard per-sample MAC cap at inference (the paper's RADI budget), as a fraction of the dense
            network's MACs; ``None``: no exit is taken. Independent of ``budget``; changeable after conversion with
            ``set_resource_budget``.
        hidden: hidden width of each skip gate.
        tau: Gumbel-Sigmoid temperature.
        budget_weight: weight of the MAC-budget loss.
        exit_weight: weight of each intermediate exit's cross-entropy.
    """

    budget: float = 0.5
    resource_budget: float | None = None
    hidden: int = 16
    tau: float = 1.0
    budget_weight: float = 1.0
    exit_weight: float = 0.5


class ExitHead(DecisionMaker):
    """An intermediate classifier: Tensor[N, C, H, W] → logits Tensor[N, K] (global average pool → linear)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def classify(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))

    def decide(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.classify(x)


@dataclass(frozen=True)
class _Costs:
    stem: float
    stages: tuple[float, ...]  # dense MACs of each stage (gates excluded)
    exits: tuple[float, ...]  # MACs of each exit classifier
    head: float


class DualDynamicInference(DynamicModel):
    """A ResNet with skip gates on its blocks and anytime exits after its stages."""

    def __init__(
        self, net: nn.Module, exits: nn.ModuleList, *, config: DualDynamicInferenceConfig, in_channels: int | None
    ):
        super().__init__(net, recipe="dual_dynamic_inference", config=config, in_channels=in_channels)
        self.exits = exits
        self.layout = network_layout(net, needed_by="dual_dynamic_inference")
        self.resource_budget = config.resource_budget
        self._costs: dict[tuple, _Costs] = {}

    def budget_knob(self) -> Knob:
        """One offset added to the keep logit of every skip gate."""
        return gate_logit_knob(self)

    def set_resource_budget(self, fraction: float | None) -> None:
        """Set the hard per-sample MAC budget (fraction of the dense network's MACs), or ``None`` for none."""
        if fraction is not None and not fraction > 0:
            raise ValueError(f"resource budget must be a positive fraction of the dense MACs, got {fraction!r}")
        self.resource_budget = fraction

    # -- static pieces and their costs ----------------------------------------------------------
    def _stage(self, k: int, y: Tensor) -> Tensor:
        for block in self.layout.stage_blocks(self.net, k):
            y = block(y)
        return y

    def _prefix(self, k: int, x: Tensor, exit_head: bool = False) -> Tensor:
        y = self.layout.stem(self.net, x)
        for j in range(k + 1):
            y = self._stage(j, y)
        return self.exits[k].classify(y) if exit_head else y

    def costs(self, x: Tensor) -> _Costs:
        """Per-sample MACs of the stem, each stage, each exit and the head at the shape of ``x`` (probed once)."""
        key = tuple(x.shape[1:])
        if key not in self._costs:
            upto = [
                probe_macs(self, lambda m, inp, k=k: m._prefix(k, inp), x) for k in range(-1, len(self.layout.stages))
            ]
            exits = [
                probe_macs(self, lambda m, inp, k=k: m._prefix(k, inp, True), x) - upto[k + 1]
                for k in range(len(self.exits))
            ]
            self._costs[key] = _Costs(
                stem=float(upto[0]),
                stages=tuple(float(upto[k + 1] - upto[k]) for k in range(len(self.layout.stages))),
                exits=tuple(float(e) for e in exits),
                head=float(self.dense_macs(x) - upto[-1]),
            )
        return self._costs[key]

    # -- forward --------------------------------------------------------------------------------
    def run(self, x: Tensor) -> Tensor:
        y = self.layout.stem(self.net, x)
        with trace() as sub:
            y = self._stage(0, y)
        logits0 = self.exits[0](y)
        if logits0 is None:  # dense mode: the base network, no gate or exit evaluated
            for k in range(1, len(self.layout.stages)):
                y = self._stage(k, y)
            return self.layout.head(self.net, y)
        return self._run_dynamic(x, y, sub, logits0)

    def _run_dynamic(self, x: Tensor, y: Tensor, sub0: Trace, logits0: Tensor) -> Tensor:
        parent = current_trace()
        n, last = x.shape[0], len(self.layout.stages) - 1
        sparse = self._sparse_mode()
        costs = self.costs(x)
        budget = None if self.resource_budget is None or self.training else self.resource_budget * self.dense_macs(x)
        cum = torch.full((n,), costs.stem, dtype=torch.float64, device=x.device)
        alive = torch.ones(n, dtype=torch.bool, device=x.device)
        idx = torch.arange(n, device=x.device)  # rows of ``y`` (sparse: the alive samples only)
        out: Tensor | None = None

        def rec(name: str, macs: Tensor, executed: Tensor | float, lo: float, hi: float, dense: float) -> None:
            if parent is not None:
                parent.record_macs(name, macs, executed=executed, minimum=lo, maximum=hi, dense=dense)

        def full(v: Tensor) -> Tensor:  # per-row values → Tensor[N], 0 for samples not in ``idx``
            if not sparse or idx.numel() == n:
                return v
            return v.new_zeros((n, *v.shape[1:])).index_copy(0, idx, v)

        rec("stem", torch.full_like(cum, costs.stem), costs.stem, costs.stem, costs.stem, costs.stem)
        sub, logits = sub0, logits0
        for k in range(last + 1):
            if k > 0:
                if idx.numel() == 0:  # nobody reaches this stage: no work at all
                    zero = cum.new_zeros(n)
                    rec(f"{self.layout.stage_names[k]}/static", zero, 0.0, 0.0, costs.stages[k], costs.stages[k])
                    if k == last:
                        rec("head", zero, 0.0, 0.0, costs.head, costs.head)
                    continue
                with trace() as sub:
                    y = self._stage(k, y)
                logits = self.exits[k](y) if k < last else self.layout.head(self.net, y)
            a = alive.double()
            # the stage's gated parts (decisions, bodies, gates), counted only for samples still running
            dense_in_gates = 0.0
            for e in sub.entries:
                macs = full(e.macs) * a
                lo = e.minimum if k == 0 else 0.0
                rec(e.name, macs, full(e.executed), lo, e.maximum, e.dense)
                dense_in_gates += e.dense
                cum = cum + macs.detach()
            if parent is not None:
                for name, d in sub.decisions.items():
                    soft = None if d.soft is None else full(d.soft) * a.to(d.soft.dtype)
                    parent.record_decision(name, Decision(full(d.hard) * a.to(d.hard.dtype), soft, d.granularity))
            rest = costs.stages[k] - dense_in_gates  # shortcuts and ungated blocks of the stage
            executed = a * rest if sparse else torch.full_like(a, rest)
            rec(f"{self.layout.stage_names[k]}/static", a * rest, executed, rest if k == 0 else 0.0, rest, rest)
            cum = cum + a * rest
            # the classifier after the stage
            c = costs.exits[k] if k < last else costs.head
            executed = a * c if sparse else torch.full_like(a, c)
            rec(f"exit{k}" if k < last else "head", a * c, executed, 0.0, c, 0.0 if k < last else c)
            cum = cum + a * c
            if out is None:
                out = logits.new_zeros((n, logits.shape[1]))
            if parent is not None and k < last:
                parent.record_output(f"exit{k}", full(logits))
            if k == last:
                stop = alive
            elif budget is None:
                stop = torch.zeros_like(alive)
            else:
                nxt = costs.stages[k + 1] + (costs.exits[k + 1] if k + 1 < last else costs.head)
                stop = alive & (cum + nxt > budget)
                if parent is not None:
                    parent.record_decision(f"exit{k}", Decision(stop.to(x.dtype), None, "exit"))
            if sparse:
                rows = stop[idx]
                out = out.index_copy(0, idx[rows], logits[rows]) if bool(rows.any()) else out
                idx, y = idx[~rows], y[~rows] if not bool(rows.all()) else y[:0]
            else:
                out = torch.where(stop.unsqueeze(1), logits, out)
            alive = alive & ~stop
        assert out is not None
        return out

    def _sparse_mode(self) -> bool:
        # Sparse mode runs in eval only (as for every dynamic block); the exits carry the model's mode.
        return not self.training and self.exits[0].mode == "sparse"

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        """CE of the final classifier + ``exit_weight`` × CE of every exit + ``budget_weight`` × MAC-budget loss."""
        cfg: DualDynamicInferenceConfig = self.config
        task = F.cross_entropy(logits, target)
        exits = [F.cross_entropy(v, target) for k, v in t.outputs.items() if k.startswith("exit")]
        exit_loss = torch.stack(exits).sum() if exits else task.new_zeros(())
        b = t.budget_loss(cfg.budget if budget is None else budget)
        total = task + cfg.exit_weight * exit_loss + cfg.budget_weight * b
        parts = {"task": float(task.detach()), "exits": float(exit_loss.detach()), "budget": float(b.detach())}
        return LossOutput(total, parts)


@recipe(
    "dual_dynamic_inference",
    paper="Dual Dynamic Inference: Enabling More Efficient, Adaptive and Controllable Deep Inference "
    "(IEEE JSTSP 2020), arXiv:1907.04523",
    budget=BudgetPolicy("trained+calibrated", knob="gate logit offset", reachable=(0.1, 1.0),
                        derives="target of the skip gates' MAC-budget loss = budget (resource_budget: the user's)"),
)  # fmt: skip
def convert(model: nn.Module, config: DualDynamicInferenceConfig, targets: Targets = "auto") -> DualDynamicInference:
    """Gate every target residual block and add an exit after every stage but the last (in place)."""
    found = residual_blocks(model, targets)  # first: a network without residual blocks is refused for that
    layout = network_layout(model, needed_by="dual_dynamic_inference")
    if len(layout.stages) < 2:
        raise ValueError("dual_dynamic_inference needs at least 2 stages (exits go between stages)")
    for name, block, adapter in found:
        gate = PooledMLPGate(adapter.in_channels(block), 1, config.hidden, open_index=None)
        new = SigmoidGatedResidual(block, adapter, gate)
        new.block_name, new.tau = name, config.tau
        replace_module(model, name, new)
    num_classes = num_classes_of(model)
    exits = nn.ModuleList()
    for k in range(len(layout.stages) - 1):
        convs = [m for b in layout.stage_blocks(model, k) for m in b.modules() if isinstance(m, nn.Conv2d)]
        channels = convs[-1].out_channels
        head = ExitHead(channels, num_classes)
        head.block_name = f"exits.{k}"
        exits.append(head)
    return DualDynamicInference(model, exits, config=copy.copy(config), in_channels=first_conv_in_channels(model))
