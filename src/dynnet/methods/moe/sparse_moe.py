"""Sparse MoE — Shazeer, Mirhoseini, Maziarz, Davis, Le, Hinton, Dean, "Outrageously Large Neural Networks: The
Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017. https://arxiv.org/abs/1701.06538

Every target residual block becomes a mixture of ``num_experts`` copies of its residual branch (the experts);
a router computes the noisy top-k gating ``G(x) = softmax(KeepTopK(H(x), k))`` with
``H(x)_e = (x W_g)_e + eps * softplus((x W_noise)_e)`` from the globally pooled block input, and the block
computes ``post(shortcut(x) + sum_e G(x)_e * expert_e(x))``. Training adds the importance and load losses of
the paper (:mod:`dynnet.losses.moe_balance`). Sparse mode dispatches with :func:`dynnet.kernels.moe.dispatch_add`
(sort by expert → one run per expert on its samples → scatter-add); masked mode is the dense weighted sum.

Departures from the paper:

* routing is per sample (the "token" is the whole image entering the block), because experts are convolutional
  residual branches; the paper routes the tokens of a sequence model to feed-forward experts;
* the experts start as copies of the original branch and expert 0 keeps the original parameter names, so a
  fresh conversion reproduces the base network (top-k weights sum to one) and dense mode is the base network;
* zero-computation experts (after MoE++): ``k`` of them, sharing one router logit, compete with the real experts
  for the ``k`` slots, so a sample may run ``k``, fewer or no real experts (then the block keeps its shortcut
  only). They start closed (logit −3); they are excluded from the balancing losses. Without them every sample
  would run ``k`` experts as large as the base branch: ``k`` times the base network's MACs, above any budget;
* optional capacity factor (GShard / Switch Transformer, batch-prioritised routing; dropped samples keep the
  shortcut only) and a dropless mode (``capacity_factor=None``, the default, as the paper has no capacity);
* W_g is initialised with tiny weights instead of zeros (all-zero logits would tie every expert).

Budget: trained and calibrated. ``budget`` is the target mean fraction of the base network's MACs per image
(routers included). Each real expert costs the base block's branch, so the budget is the mean number of real
experts a sample runs per block (of its ``k`` slots; the zero experts take the rest: about ``1 - budget / k`` of
the slots); ``k``, the number of experts and the capacity keep their paper meaning. Training adds the MAC-budget
loss ``budget_weight * (mean MAC fraction - budget)^2`` (the count of real experts is straight-through, with the
gradient of ``k`` times the router's softmax mass on the real experts); calibration then lowers or raises the
zero experts' logit in every router by one offset (``calibration[0]``) until the mean MAC fraction on held-out
images equals the budget. Reachable: from the shortcuts alone (about 0.06 of ResNet-8) to ``k`` real experts
everywhere (up to ``k`` times the base); the declared range is 0.1-1.0.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.blocks.residual import adopt_children
from dynnet.convert import Targets, first_conv_in_channels, replace_module, residual_blocks
from dynnet.convert.residual import ResidualAdapter
from dynnet.core import Decision, DynamicBlock, DynamicModel, current_trace
from dynnet.core.budget import BudgetPolicy, Knob, LogitShift
from dynnet.core.recipe import recipe
from dynnet.estimators import straight_through
from dynnet.gates import open_bias_
from dynnet.kernels.moe import capacity_keep, dense_combine, dispatch_add, expert_capacity, expert_counts
from dynnet.losses.moe_balance import cv_squared, importance_loss, prob_in_top_k
from dynnet.methods.moe._load import expert_load

__all__ = [
    "MoEResidual",
    "NoisyTopKRouter",
    "SparseMoE",
    "SparseMoEConfig",
    "convert",
    "noisy_top_k_gating",
    "with_zero_experts",
]


ZERO_LOGIT = -3.0  # initial router logit of the zero experts: never in the top-k of a fresh model (eval)


@dataclass(frozen=True)
class SparseMoEConfig:
    """Settings of the sparsely-gated MoE.

    Attributes:
        budget: target mean fraction of the base network's MACs per image (routers included), i.e. the mean number
            of real experts a sample runs per block (each costs the base branch): the target of the MAC-budget loss
            and of calibration (the zero experts' logit offset). 1.0: the base network's compute, more parameters.
        num_experts: E real experts per block (copies of the residual branch).
        k: slots per sample (the paper uses 2 or 4), filled by real experts or zero-computation experts.
        noisy: tunable Gaussian noise on the router logits in training (the paper's noisy top-k).
        capacity_factor: slots per expert ``ceil(cf * N * k / E)``; ``None``: dropless.
        importance_weight: weight of ``CV(Importance)^2`` (0.1 in the paper).
        load_weight: weight of ``CV(Load)^2`` (0.1 in the paper).
        budget_weight: weight of the MAC-budget loss.
    """

    budget: float = 1.0
    num_experts: int = 4
    k: int = 2
    noisy: bool = True
    capacity_factor: float | None = None
    importance_weight: float = 0.1
    load_weight: float = 0.1
    budget_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.num_experts < 2:
            raise ValueError(f"num_experts must be at least 2, got {self.num_experts}")
        if not 1 <= self.k <= self.num_experts:
            raise ValueError(f"k must be in [1, num_experts={self.num_experts}], got {self.k}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {self.capacity_factor}")


def noisy_top_k_gating(
    clean: Tensor, noise_std: Tensor | None, k: int, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Noisy top-k gating ``G = softmax(KeepTopK(clean + eps * noise_std, k))``.

    Args:
        clean: Tensor[N, E] clean logits.
        noise_std: Tensor[N, E] noise scales, or ``None`` for no noise (inference).
        k: kept experts per sample.
        generator: random generator of ``eps``.

    Returns:
        ``(gates, index, logits)``: Tensor[N, E] gates (zero outside the top-k, rows sum to 1), Tensor[N, k] long
        experts in decreasing gate order, Tensor[N, E] the (noisy) logits that were ranked.
    """
    logits = clean
    if noise_std is not None:
        eps = torch.randn(clean.shape, dtype=clean.dtype, device=clean.device, generator=generator)
        logits = clean + eps * noise_std
    top_val, index = logits.topk(k, dim=1)
    gates = torch.zeros_like(logits).scatter(1, index, F.softmax(top_val, dim=1))
    return gates, index, logits


def with_zero_experts(values: Tensor, num_experts: int, k: int) -> Tensor:
    """Tensor[N, E + 1] (real experts, then the zero experts' shared column) → Tensor[N, E + k]: the shared column
    repeated ``k`` times, so that the zero experts can fill any number of the ``k`` slots."""
    return torch.cat([values[:, :num_experts], values[:, num_experts:].expand(-1, k)], 1)


class NoisyTopKRouter(nn.Module):
    """Global average pool → ``W_g`` (clean logits) and ``W_noise`` (noise scale): Tensor[N, C, H, W] → 2×Tensor[N, E'].

    Args:
        in_channels: C.
        num_outputs: E' (real experts plus the zero experts' shared logit).
        closed: indices of outputs that start closed (bias :data:`ZERO_LOGIT`), e.g. the zero experts.
    """

    def __init__(self, in_channels: int, num_outputs: int, closed: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.w_gate = open_bias_(nn.Linear(in_channels, num_outputs), logit=0.0)
        self.w_noise = nn.Linear(in_channels, num_outputs)
        with torch.no_grad():
            self.w_gate.bias[list(closed)] = ZERO_LOGIT
            nn.init.zeros_(self.w_noise.weight)
            nn.init.zeros_(self.w_noise.bias)

    def forward(self, x: Tensor, noisy: bool) -> tuple[Tensor, Tensor | None]:
        """Returns ``(clean, noise_std)``: Tensor[N, E'] each (``noise_std`` is ``None`` when not noisy)."""
        h = self.pool(x).flatten(1)
        clean = self.w_gate(h)
        return clean, (F.softplus(self.w_noise(h)) + 1e-2 if noisy else None)


def _used_children(block: nn.Module, body: Callable[[Tensor], Tensor], in_channels: int) -> set[str]:
    """Names of the direct children of ``block`` that its residual branch uses (found with one tiny eval run)."""
    ran: set[str] = set()
    hooks = [m.register_forward_hook(lambda *_, n=name: ran.add(n)) for name, m in block.named_children()]
    modes = {m: m.training for m in block.modules()}
    param = next(block.parameters())
    try:
        block.eval()
        with torch.no_grad():
            body(torch.zeros(1, in_channels, 8, 8, dtype=param.dtype, device=param.device))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return ran


class MoEResidual(DynamicBlock):
    """A residual block whose branch is a mixture of experts; expert 0 keeps the original children's names.

    Args:
        block: the original residual block.
        adapter: how to split it into body, shortcut and post-op.
        config: the recipe's settings.
    """

    granularity = "expert"

    def __init__(self, block: nn.Module, adapter: ResidualAdapter, config: SparseMoEConfig) -> None:
        super().__init__()
        adopt_children(self, block)
        self.adapter = adapter
        self.num_experts, self.k = config.num_experts, config.k
        self.noisy, self.capacity_factor = config.noisy, config.capacity_factor
        self.importance_weight, self.load_weight = config.importance_weight, config.load_weight
        c_in = adapter.in_channels(block)
        used = _used_children(block, lambda x: adapter.body(block, x), c_in)
        copies = []
        for _ in range(config.num_experts - 1):
            expert = copy.deepcopy(block)
            for child_name, _child in block.named_children():
                if child_name not in used:
                    setattr(expert, child_name, None)
            copies.append(expert)
        self.experts = nn.ModuleList(copies)
        self.router = NoisyTopKRouter(c_in, config.num_experts + 1, (config.num_experts,))

    # -- pieces ---------------------------------------------------------------------------------
    def expert(self, e: int, x: Tensor) -> Tensor:
        """Residual branch of expert ``e``: Tensor[N, C, H, W] → Tensor[N, C', H', W']."""
        return self.adapter.body(self._block if e == 0 else self.experts[e - 1], x)

    def shortcut(self, x: Tensor) -> Tensor:
        return self.adapter.shortcut(self._block, x)

    def post(self, y: Tensor) -> Tensor:
        return self.adapter.post(self._block, y)

    def _expert_fns(self) -> list[Callable[[Tensor], Tensor]]:
        return [lambda inp, e=e: self.expert(e, inp) for e in range(self.num_experts)]

    def route(self, x: Tensor) -> tuple[Decision, Tensor, Tensor, Tensor]:
        """Route a batch.

        Returns:
            ``(decision, index, weight, used)``: the decision (``hard`` Tensor[N, E + 1] 0/1 selection of the real
            experts, straight-through in training; its last column, the zero experts, is 0; ``soft`` the gates, the
            zero experts' summed), Tensor[N, k] experts (``-1`` for a zero expert or a dropped choice), Tensor[N, k]
            their weights and Tensor[N] the number of real experts each sample runs (straight-through: the exact
            count forward, the gradient of ``k`` × the router's softmax mass on the real experts).
        """
        e, k = self.num_experts, self.k
        noisy = self.noisy and self.training
        clean, noise_std = self.router(x, noisy)
        clean_k = with_zero_experts(clean, e, k)
        std_k = None if noise_std is None else with_zero_experts(noise_std, e, k)
        gates_k, index, logits_k = noisy_top_k_gating(clean_k, std_k, k)
        weight = gates_k.gather(1, index)
        gates = torch.cat([gates_k[:, :e], gates_k[:, e:].sum(1, keepdim=True)], 1)
        routed = index < e
        if self.capacity_factor is not None:
            cap = expert_capacity(x.shape[0], e, k, self.capacity_factor)
            routed = routed & capacity_keep(index, e, cap)
        index = torch.where(routed, index, torch.full_like(index, -1))
        selected = torch.zeros_like(gates).scatter_add(1, index.clamp(min=0), routed.to(gates.dtype))
        kept_gates = gates * selected
        real_mass = k * F.softmax(logits_k, dim=1)[:, :e].sum(1)
        used = straight_through(selected[:, :e].sum(1), real_mass)
        t = current_trace()
        if t is not None and self.training:
            real = slice(0, e)
            aux = self.importance_weight * importance_loss(gates[:, real])
            if std_k is not None:
                p = prob_in_top_k(clean_k, logits_k, std_k, k)
                aux = aux + self.load_weight * cv_squared(p[:, real].sum(0))
            t.add_loss(f"{self.block_name}/balance", aux)
        decision = Decision(hard=straight_through(selected, kept_gates), soft=gates, granularity="expert")
        return decision, index, weight * routed.to(weight.dtype), used

    # -- modes ----------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor) -> Tensor:
        return self.post(self.shortcut(x) + self.expert(0, x))

    def forward_masked(self, x: Tensor) -> Tensor:
        d, index, _, used = self.route(x)
        gates = d.hard * d.soft  # straight-through selection × gate value: the kept gates
        out = self.post(dense_combine(self._expert_fns(), x, gates, self.shortcut(x)))
        self._record(x, d, index, used, sparse=False)
        return out

    def forward_sparse(self, x: Tensor) -> Tensor:
        d, index, weight, used = self.route(x)
        out = dispatch_add(self._expert_fns(), x, index, weight, self.shortcut(x))
        if out is x:  # no real expert anywhere and an identity shortcut: the post-op never edits the input
            out = out.clone()
        out = self.post(out)
        self._record(x, d, index, used, sparse=True)
        return out

    # -- bookkeeping ----------------------------------------------------------------------------
    def _record(self, x: Tensor, d: Decision, index: Tensor, used: Tensor, *, sparse: bool) -> None:
        t = current_trace()
        if t is None:
            return
        n = x.shape[0]
        t.record_decision(self.block_name, d)
        t.record_output(f"{self.block_name}/load", expert_counts(index, self.num_experts))
        body = self.cost("expert", lambda m, inp: m.expert(0, inp), x)
        used = used.double()
        executed = used.detach() * body if sparse else float(self.num_experts * body)
        t.record_macs(
            f"{self.block_name}/experts",
            used * body,
            executed=executed,
            minimum=0.0,
            maximum=self.k * body,
            dense=body,
        )
        noisy = self.noisy and self.training
        g = self.cost(f"router{int(noisy)}", lambda m, inp: m.router(inp, noisy), x)
        t.record_macs(f"{self.block_name}/router", float(g), batch_size=n, minimum=g, maximum=g)


class SparseMoE(DynamicModel):
    """The converted network; objective: cross-entropy + MAC-budget loss + balancing losses."""

    def budget_knob(self) -> Knob:
        """One offset subtracted from the zero experts' logit in every router: the larger, the more real experts."""
        entries = [(b.router.w_gate.bias, b.num_experts, -1.0) for _, b in self.blocks()]
        return LogitShift(self.calibration[0], entries).knob(name="zero-expert logit offset")


@recipe(
    "sparse_moe",
    paper="Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer (ICLR 2017), "
    "arXiv:1701.06538",
    budget=BudgetPolicy("trained+calibrated", knob="zero-expert logit offset", reachable=(0.1, 1.0),
                        derives="mean real experts per sample and block = budget (of k slots; zero experts take "
                        "the rest); MAC-budget loss target = budget"),
    bench_metrics=expert_load,  # the experts' share of the test images in `dynnet bench`
)  # fmt: skip
def convert(model: nn.Module, config: SparseMoEConfig, targets: Targets = "auto") -> SparseMoE:
    """Turn every target residual block of ``model`` into a mixture of experts (in place)."""
    for name, block, adapter in residual_blocks(model, targets):
        new = MoEResidual(block, adapter, config)
        new.block_name = name
        replace_module(model, name, new)
    return SparseMoE(model, recipe="sparse_moe", config=copy.copy(config), in_channels=first_conv_in_channels(model))
