"""HydraNets — Mullapudi, Mark, Shazeer, Fatahalian, "HydraNets: Specialized Dynamic Architectures for Efficient
Inference", CVPR 2018. https://openaccess.thecvf.com/content_cvpr_2018/papers/Mullapudi_HydraNets_Specialized_Dynamic_CVPR_2018_paper.pdf

The last stage of the base network is replicated into ``num_branches`` branches that specialise on subsets of
the classes; a gate on the shared trunk's features picks a few branches per input, whose features are averaged
and fed to the shared classifier. The gate is trained as a multi-label classifier of which branches are
relevant (the true class belongs to the branch's subset), next to the cross-entropy of the combined prediction.
In sparse mode the selected branches run only on their samples (:func:`dynnet.kernels.moe.dispatch_add`).

Departures from the paper:

* the class subsets are a round-robin partition of the classes (``c % num_branches``); the paper clusters
  classes from the confusion matrix of a trained network;
* the gate selects the branches whose probability passes ``threshold`` (at least one, at most ``k``), so the
  per-sample cost varies; the paper takes a fixed top-k;
* branches start as copies of the original stage and the gate starts open, so a fresh conversion reproduces
  the base network (the mean of identical branches), and dense mode is the base (branch 0);
* the branches are one residual stage (the last one) rather than the paper's hand-designed branch layers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels, replace_module, residual_blocks
from dynnet.core import (
    Decision,
    DynamicBlock,
    DynamicModel,
    LossOutput,
    RecipeSpec,
    Trace,
    current_trace,
    register_recipe,
)
from dynnet.estimators import straight_through
from dynnet.gates import PooledMLPGate
from dynnet.kernels.moe import dense_combine, dispatch_add, expert_counts

__all__ = ["HydraNet", "HydraNetsConfig", "HydraStage", "branch_relevance", "convert", "select_branches"]


@dataclass(frozen=True)
class HydraNetsConfig:
    """Settings of HydraNets.

    Attributes:
        budget: optional target fraction of dense MACs (adds the MAC-budget loss).
        num_branches: B, copies of the last stage.
        k: at most this many branches per input.
        threshold: a branch runs when its gate probability reaches this value (the best one always runs).
        hidden: hidden width of the gate.
        gate_weight: weight of the gate's multi-label loss.
        budget_weight: weight of the MAC-budget loss.
    """

    budget: float | None = None
    num_branches: int = 4
    k: int = 2
    threshold: float = 0.5
    hidden: int = 32
    gate_weight: float = 1.0
    budget_weight: float = 1.0

    def __post_init__(self) -> None:
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
    """A stage replicated into branches with a gate; branch 0 keeps the original stage's parameter names.

    Args:
        stage: the original stage (Tensor[N, C, H, W] → Tensor[N, C', H', W']).
        in_channels: C.
        config: the recipe's settings.
    """

    granularity = "block"

    def __init__(self, stage: nn.Module, in_channels: int, config: HydraNetsConfig) -> None:
        super().__init__()
        for child_name, child in stage.named_children():
            self.add_module(child_name, child)
        object.__setattr__(self, "_stage", stage)
        self.branches = nn.ModuleList(copy.deepcopy(stage) for _ in range(config.num_branches - 1))
        self.gate = PooledMLPGate(in_channels, config.num_branches, config.hidden, open_index=None)
        self.k, self.threshold = config.k, config.threshold

    def branch(self, b: int, x: Tensor) -> Tensor:
        return self._stage(x) if b == 0 else self.branches[b - 1](x)

    def _fns(self) -> list:
        return [lambda inp, b=b: self.branch(b, inp) for b in range(len(self.branches) + 1)]

    def decide(self, x: Tensor) -> tuple[Decision, Tensor]:
        """Decision (hard Tensor[N, B], straight-through in training) and the gate logits Tensor[N, B]."""
        logits = self.gate(x)
        prob = torch.sigmoid(logits)
        chosen = select_branches(prob.detach(), self.k, self.threshold).to(x.dtype)
        return Decision(straight_through(chosen, prob), prob, "block"), logits

    def forward_dense(self, x: Tensor) -> Tensor:
        return self.branch(0, x)

    def forward_masked(self, x: Tensor) -> Tensor:
        d, logits = self.decide(x)
        weights = d.hard / d.hard.detach().sum(1, keepdim=True)
        out = dense_combine(self._fns(), x, weights, 0.0)
        self._record(x, d, logits, sparse=False)
        return out

    def forward_sparse(self, x: Tensor) -> Tensor:
        d, logits = self.decide(x)
        chosen = d.hard > 0.5
        count = chosen.sum(1, keepdim=True)
        order = torch.argsort(chosen.to(torch.int8), dim=1, descending=True, stable=True)[:, : self.k]
        index = torch.where(chosen.gather(1, order), order, torch.full_like(order, -1))
        weight = (index >= 0).to(x.dtype) / count.to(x.dtype)
        out = dispatch_add(self._fns(), x, index, weight)
        self._record(x, d, logits, sparse=True)
        return out

    def _record(self, x: Tensor, d: Decision, logits: Tensor, *, sparse: bool) -> None:
        t = current_trace()
        if t is None:
            return
        n, b = x.shape[0], len(self.branches) + 1
        t.record_decision(self.block_name, d)
        t.record_output(f"{self.block_name}/gate_logits", logits)
        t.record_output(f"{self.block_name}/load", expert_counts(d.hard.detach().nonzero()[:, 1], b))
        cost = self.cost("branch", lambda m, inp: m.branch(0, inp), x)
        used = d.hard.sum(1).double()
        executed = used.detach() * cost if sparse else float(b * cost)
        t.record_macs(
            f"{self.block_name}/branches",
            used * cost,
            executed=executed,
            minimum=cost,
            maximum=self.k * cost,
            dense=cost,
        )
        g = self.cost("gate", lambda m, inp: m.gate(inp), x)
        t.record_macs(f"{self.block_name}/gate", float(g), batch_size=n, minimum=g, maximum=g)


class HydraNet(DynamicModel):
    """HydraNets as a :class:`DynamicModel`; objective: cross-entropy + gate multi-label loss (+ MAC budget)."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        out = super().compute_loss(logits, target, t, budget)
        gate_terms = [
            F.binary_cross_entropy_with_logits(v, branch_relevance(target, v.shape[1]))
            for k, v in t.outputs.items()
            if k.endswith("/gate_logits")
        ]
        if gate_terms:
            gate = self.config.gate_weight * torch.stack(gate_terms).mean()
            out.total = out.total + gate
            out.parts["gate"] = float(gate.detach())
        return out


def convert(model: nn.Module, config: HydraNetsConfig, targets: Targets = "auto") -> HydraNet:
    """Replicate the stage holding the last residual block of ``model`` into gated branches (in place).

    ``targets`` selects the residual blocks considered; the parent of the last one is the stage replicated.
    """
    blocks = residual_blocks(model, targets)
    last_name, _, adapter = blocks[-1]
    stage_name = last_name.rpartition(".")[0]
    if not stage_name:
        raise ValueError(f"hydranets needs the last residual block inside a stage, got {last_name!r}")
    stage = model.get_submodule(stage_name)
    first = next(m for n, m, _ in blocks if n.startswith(stage_name + "."))
    new = HydraStage(stage, adapter.in_channels(first), config)
    new.block_name = stage_name
    replace_module(model, stage_name, new)
    return HydraNet(model, recipe="hydranets", config=copy.copy(config), in_channels=first_conv_in_channels(model))


SPEC = register_recipe(
    RecipeSpec(
        name="hydranets",
        family="moe",
        config_cls=HydraNetsConfig,
        convert=convert,
        paper="HydraNets: Specialized Dynamic Architectures for Efficient Inference (CVPR 2018)",
    )
)
