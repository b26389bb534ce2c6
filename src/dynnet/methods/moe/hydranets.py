"""HydraNets — Mullapudi, Mark, Shazeer, Fatahalian, "HydraNets: Specialized Dynamic Architectures for Efficient
Inference", CVPR 2018. https://openaccess.thecvf.com/content_cvpr_2018/papers/Mullapudi_HydraNets_Specialized_Dynamic_CVPR_2018_paper.pdf

The last ``stages`` stages of the base network are each replicated into ``num_branches`` branches that specialise
on subsets of the classes; a gate on the stage's input picks a few branches per input, whose outputs are averaged
and passed on (to the next stage, or to the shared classifier). The gate is trained as a multi-label classifier of
which branches are relevant (the true class belongs to the branch's subset), next to the cross-entropy of the
combined prediction. In sparse mode the selected branches run only on their samples
(:func:`dynnet.kernels.moe.dispatch_add`).

Departures from the paper:

* the class subsets are a round-robin partition of the classes (``c % num_branches``); the paper clusters
  classes from the confusion matrix of a trained network;
* the gate selects the branches whose probability passes ``threshold`` (at least one, at most ``k``), so the
  per-sample cost varies; the paper takes a fixed top-k;
* branches start as copies of the original stage and the gate starts open, so a fresh conversion reproduces
  the base network (the mean of identical branches), and dense mode is the base (branch 0);
* the branches are whole residual stages (the last ``stages``, each with its own gate) rather than the paper's
  hand-designed branch layers after one stem and one gate;
* a zero-computation branch: the stage's shortcuts alone (projection and post-op of every block, no residual
  branch). It runs instead of any real branch when its gate logit beats every real branch's; it starts closed
  (logit −3). The paper saves compute with branches narrower than the base network's layers; branches copied from
  the base each cost the whole stage, so without it a HydraNet could never spend less than its base.

Budget: trained and calibrated. ``budget`` is the target mean fraction of the base network's MACs per image (gates
included): the target of the MAC-budget loss ``budget_weight * (mean MAC fraction - budget)^2`` (the count of real
branches is straight-through, with the gradient of ``sum_b p_b * (1 - p_zero)``), which trades the number of real
branches per input (``k``, ``threshold``: the paper's knobs, kept) against the zero branch. Calibration then adds
one offset to the logit of every real branch in every gate (``calibration[0]``; fewer inputs take the zero branch
and more pass ``threshold`` for a second branch as it grows) until the mean MAC fraction on held-out images equals
the budget. Reachable: from the stages' shortcuts alone (about 0.37 of ResNet-20, 0.43 of
ResNet-8 with ``stages=2``) to ``k`` branches everywhere (above the base); the declared range is 0.45-1.0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import ResidualAdapter, Targets, first_conv_in_channels, replace_module, residual_blocks
from dynnet.core import Decision, DynamicBlock, DynamicModel, LossOutput, Trace, current_trace
from dynnet.core.budget import BudgetPolicy, Knob, LogitShift
from dynnet.core.recipe import recipe
from dynnet.estimators import straight_through
from dynnet.gates import PooledMLPGate
from dynnet.kernels.moe import dense_combine, dispatch_add, expert_counts
from dynnet.methods.moe._load import expert_load
from dynnet.testing.scramble import register_randomiser

__all__ = ["HydraNet", "HydraNetsConfig", "HydraStage", "branch_relevance", "convert", "select_branches"]


ZERO_LOGIT = -3.0  # initial gate logit of the zero branch: it never beats the open real branches (logit 3)


@dataclass(frozen=True)
class HydraNetsConfig:
    """Settings of HydraNets.

    Attributes:
        budget: target mean fraction of the base network's MACs per image (gates included): the target of the
            MAC-budget loss and of calibration (an offset on the real branches' gate logits).
        stages: how many of the last stages get branches (each its own gate).
        num_branches: B, copies of each such stage.
        k: at most this many branches per input.
        threshold: a branch runs when its gate probability reaches this value (the best one always runs, unless the
            zero branch beats it).
        hidden: hidden width of the gate.
        gate_weight: weight of the gate's multi-label loss.
        budget_weight: weight of the MAC-budget loss.
    """

    budget: float = 0.75
    stages: int = 2
    num_branches: int = 4
    k: int = 2
    threshold: float = 0.5
    hidden: int = 32
    gate_weight: float = 1.0
    budget_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if self.num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {self.num_branches}")
        if not 1 <= self.k <= self.num_branches:
            raise ValueError(f"k must be in [1, num_branches={self.num_branches}], got {self.k}")


def select_branches(prob: Tensor, k: int, threshold: float) -> Tensor:
    """Branches with ``prob >= threshold`` among the top-k, and always the best one: Tensor[N, B] bool."""
    top = prob.topk(k, dim=1).indices
    in_top = torch.zeros_like(prob, dtype=torch.bool).scatter(1, top, True)
    best = torch.zeros_like(in_top).scatter(1, top[:, :1], True)
    return (in_top & (prob >= threshold)) | best


def branch_relevance(target: Tensor, num_branches: int) -> Tensor:
    """Tensor[N, B] float: 1 for the branch whose class subset (``c % B``) holds the true class."""
    return F.one_hot(target % num_branches, num_branches).float()


class HydraStage(DynamicBlock):
    """A stage replicated into branches with a gate and a zero branch; branch 0 keeps the original parameter names.

    Args:
        stage: the original stage (Tensor[N, C, H, W] → Tensor[N, C', H', W']), a sequence of residual blocks.
        adapters: the residual adapter of each of its blocks, in order (for the zero branch).
        in_channels: C.
        config: the recipe's settings.
    """

    granularity = "block"

    def __init__(
        self, stage: nn.Module, adapters: list[ResidualAdapter], in_channels: int, config: HydraNetsConfig
    ) -> None:
        super().__init__()
        for child_name, child in stage.named_children():
            self.add_module(child_name, child)
        object.__setattr__(self, "_stage", stage)
        self.adapters = list(adapters)
        self.num_branches = config.num_branches
        self.branches = nn.ModuleList(copy.deepcopy(stage) for _ in range(config.num_branches - 1))
        self.gate = PooledMLPGate(in_channels, config.num_branches + 1, config.hidden, open_index=None)
        with torch.no_grad():
            self.gate.fc2.bias[config.num_branches] = ZERO_LOGIT
        self.k, self.threshold = config.k, config.threshold

    def branch(self, b: int, x: Tensor) -> Tensor:
        return self._stage(x) if b == 0 else self.branches[b - 1](x)

    def zero_branch(self, x: Tensor) -> Tensor:
        """The stage without its residual branches: ``post(shortcut(.))`` of every block (projections only)."""
        for block, adapter in zip(self._stage.children(), self.adapters, strict=True):
            s = adapter.shortcut(block, x)
            x = adapter.post(block, s.clone() if s is x else s)  # the post-op never edits its input in place
        return x

    def _fns(self) -> list:
        return [lambda inp, b=b: self.branch(b, inp) for b in range(self.num_branches)] + [self.zero_branch]

    def decide(self, x: Tensor) -> tuple[Decision, Tensor, Tensor]:
        """Route a batch.

        Returns:
            ``(decision, logits, used)``: the decision (hard Tensor[N, B + 1], the real branches then the zero
            branch, straight-through in training), the gate logits Tensor[N, B + 1] and Tensor[N] the number of
            real branches each sample runs (straight-through: the exact count forward, the gradient of
            ``sum_b p_b * (1 - p_zero)``).
        """
        b = self.num_branches
        logits = self.gate(x)
        prob = torch.sigmoid(logits)
        p = prob.detach()
        zero = logits.detach()[:, b] > logits.detach()[:, :b].max(1).values  # logits: no ties from saturation
        real = select_branches(p[:, :b], self.k, self.threshold) & ~zero.unsqueeze(1)
        chosen = torch.cat([real, zero.unsqueeze(1)], 1).to(x.dtype)
        used = straight_through(chosen[:, :b].sum(1), prob[:, :b].sum(1) * (1 - prob[:, b]))
        return Decision(straight_through(chosen, prob), prob, "block"), logits, used

    def forward_dense(self, x: Tensor) -> Tensor:
        return self.branch(0, x)

    def forward_masked(self, x: Tensor) -> Tensor:
        d, logits, used = self.decide(x)
        weights = d.hard / d.hard.detach().sum(1, keepdim=True)
        out = dense_combine(self._fns(), x, weights, 0.0)
        self._record(x, d, logits, used, sparse=False)
        return out

    def forward_sparse(self, x: Tensor) -> Tensor:
        d, logits, used = self.decide(x)
        chosen = d.hard > 0.5
        count = chosen.sum(1, keepdim=True)
        order = torch.argsort(chosen.to(torch.int8), dim=1, descending=True, stable=True)[:, : self.k]
        index = torch.where(chosen.gather(1, order), order, torch.full_like(order, -1))
        weight = (index >= 0).to(x.dtype) / count.to(x.dtype)
        out = dispatch_add(self._fns(), x, index, weight)
        self._record(x, d, logits, used, sparse=True)
        return out

    def _record(self, x: Tensor, d: Decision, logits: Tensor, used: Tensor, *, sparse: bool) -> None:
        t = current_trace()
        if t is None:
            return
        n, b = x.shape[0], self.num_branches
        t.record_decision(self.block_name, d)
        t.record_output(f"{self.block_name}/gate_logits", logits)
        t.record_output(f"{self.block_name}/load", expert_counts(d.hard.detach()[:, :b].nonzero()[:, 1], b))
        cost = self.cost("branch", lambda m, inp: m.branch(0, inp), x)
        used = used.double()
        executed = used.detach() * cost if sparse else float(b * cost)
        t.record_macs(
            f"{self.block_name}/branches",
            used * cost,
            executed=executed,
            minimum=0.0,
            maximum=self.k * cost,
            dense=cost,
        )
        zero_cost = self.cost("zero", lambda m, inp: m.zero_branch(inp), x)
        zero = d.hard.detach()[:, b].double()
        t.record_macs(
            f"{self.block_name}/zero_branch",
            zero * zero_cost,
            executed=zero * zero_cost if sparse else float(zero_cost),
            minimum=0.0,
            maximum=zero_cost,
        )
        g = self.cost("gate", lambda m, inp: m.gate(inp), x)
        t.record_macs(f"{self.block_name}/gate", float(g), batch_size=n, minimum=g, maximum=g)


class HydraNet(DynamicModel):
    """HydraNets as a :class:`DynamicModel`; objective: cross-entropy + MAC budget + gate multi-label loss."""

    def budget_knob(self) -> Knob:
        """One offset added to the logit of every real branch in every gate (the zero branch's stays): the larger,
        the fewer inputs take the zero branch and the more pass ``threshold`` for a second branch."""
        entries = [(s.gate.fc2.bias, b, 1.0) for _, s in self.blocks() for b in range(s.num_branches)]
        return LogitShift(self.calibration[0], entries).knob(name="branch logit offset")

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        out = super().compute_loss(logits, target, t, budget)
        gate_terms = [
            F.binary_cross_entropy_with_logits(v[:, :-1], branch_relevance(target, v.shape[1] - 1))
            for k, v in t.outputs.items()
            if k.endswith("/gate_logits")
        ]
        if gate_terms:
            gate = self.config.gate_weight * torch.stack(gate_terms).mean()
            out.total = out.total + gate
            out.parts["gate"] = float(gate.detach())
        return out


@recipe(
    "hydranets",
    paper="HydraNets: Specialized Dynamic Architectures for Efficient Inference (CVPR 2018)",
    budget=BudgetPolicy("trained+calibrated", knob="branch logit offset", reachable=(0.45, 1.0),
                        derives="MAC-budget loss target = budget (number of real branches per input vs the zero "
                        "branch; k and threshold kept)"),
    test_base="cifar_resnet20",
    bench_metrics=expert_load,  # the experts' share of the test images in `dynnet bench`
)  # fmt: skip
def convert(model: nn.Module, config: HydraNetsConfig, targets: Targets = "auto") -> HydraNet:
    """Replicate the last ``config.stages`` stages of ``model`` into gated branches (in place).

    ``targets`` selects the residual blocks considered; a stage is the parent of target blocks, and every child of a
    replicated stage must be a target residual block (its shortcut is the zero branch).
    """
    stages: dict[str, list[tuple[nn.Module, ResidualAdapter]]] = {}
    for name, block, adapter in residual_blocks(model, targets):
        parent = name.rpartition(".")[0]
        if not parent:
            raise ValueError(f"hydranets needs residual blocks inside stages, got {name!r}")
        stages.setdefault(parent, []).append((block, adapter))
    chosen = list(stages)[-config.stages :]
    if len(chosen) < config.stages:
        raise ValueError(f"hydranets: stages={config.stages} but {type(model).__name__} has {len(chosen)} stage(s)")
    for stage_name in chosen:
        stage, items = model.get_submodule(stage_name), stages[stage_name]
        if [id(m) for m in stage.children()] != [id(b) for b, _ in items]:
            raise ValueError(f"hydranets: every child of stage {stage_name!r} must be a target residual block")
        new = HydraStage(stage, [a for _, a in items], items[0][1].in_channels(items[0][0]), config)
        new.block_name = stage_name
        replace_module(model, stage_name, new)
    return HydraNet(model, recipe="hydranets", config=copy.copy(config), in_channels=first_conv_in_channels(model))


@register_randomiser(HydraNet)
def _randomise(model: HydraNet, generator: torch.Generator) -> int:
    """Random gates and distinct branches (for the conformance suite); returns how many tensors changed.

    The gates are drawn as the suite draws any gate (weights ``N(0, 1 / fan_in)``, biases and scales ``N(0, 1)``).
    The branches start as copies of the stage, so which of them run would not change the logits and comparing
    execution modes would not see a sample sent to the wrong branch: every parameter of branches ``1..B-1`` is
    scaled by ``1 + 0.1 N(0, 1)``. Branch 0 (the base's stage, dense mode) is kept.
    """
    changed = 0
    with torch.no_grad():
        for _, stage in model.blocks():
            for p in stage.gate.parameters():
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)
                changed += 1
            for p in stage.branches.parameters():
                p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
                changed += 1
    return changed
