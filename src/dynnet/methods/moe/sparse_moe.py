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
* a zero-computation "skip" expert (``skip_expert=True``, after MoE++ / Switch-style token dropping) can take
  one of the k slots; it starts closed (bias −6) and makes the per-sample cost vary, which the optional MAC
  budget loss can exploit; it is excluded from the balancing losses;
* optional capacity factor (GShard / Switch Transformer, batch-prioritised routing; dropped samples keep the
  shortcut only) and a dropless mode (``capacity_factor=None``, the default, as the paper has no capacity);
* W_g is initialised with tiny weights instead of zeros (all-zero logits would tie every expert).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels, replace_module, residual_blocks
from dynnet.convert.residual import ResidualAdapter
from dynnet.core import Decision, DynamicBlock, DynamicModel, RecipeSpec, current_trace, register_recipe
from dynnet.estimators import straight_through
from dynnet.gates import open_bias_
from dynnet.kernels.moe import capacity_keep, dense_combine, dispatch_add, expert_capacity, expert_counts
from dynnet.losses.moe_balance import cv_squared, importance_loss, prob_in_top_k

__all__ = ["MoEResidual", "NoisyTopKRouter", "SparseMoE", "SparseMoEConfig", "convert", "noisy_top_k_gating"]


@dataclass(frozen=True)
class SparseMoEConfig:
    """Settings of the sparsely-gated MoE.

    Attributes:
        budget: optional target fraction of dense MACs (adds the MAC-budget loss); ``None``: no budget loss.
            With ``k=2`` experts the dense network is half the all-experts cost, so a budget below the top-k
            cost needs the skip expert.
        num_experts: E real experts per block (copies of the residual branch).
        k: experts per sample (the paper uses 2 or 4).
        skip_expert: add a zero-computation expert that can take one of the k slots.
        noisy: tunable Gaussian noise on the router logits in training (the paper's noisy top-k).
        capacity_factor: slots per expert ``ceil(cf * N * k / E)``; ``None``: dropless.
        importance_weight: weight of ``CV(Importance)^2`` (0.1 in the paper).
        load_weight: weight of ``CV(Load)^2`` (0.1 in the paper).
        budget_weight: weight of the MAC-budget loss.
    """

    budget: float | None = None
    num_experts: int = 4
    k: int = 2
    skip_expert: bool = True
    noisy: bool = True
    capacity_factor: float | None = None
    importance_weight: float = 0.1
    load_weight: float = 0.1
    budget_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.num_experts < 2:
            raise ValueError(f"num_experts must be at least 2, got {self.num_experts}")
        if not 0 < self.k < self.num_experts + int(self.skip_expert):
            raise ValueError(f"k must be in [1, {self.num_experts + int(self.skip_expert) - 1}], got {self.k}")
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


class NoisyTopKRouter(nn.Module):
    """Global average pool → ``W_g`` (clean logits) and ``W_noise`` (noise scale): Tensor[N, C, H, W] → 2×Tensor[N, E'].

    Args:
        in_channels: C.
        num_outputs: E' (real experts plus the skip expert).
        closed: indices of outputs that start closed (bias −6), e.g. the skip expert.
    """

    def __init__(self, in_channels: int, num_outputs: int, closed: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.w_gate = open_bias_(nn.Linear(in_channels, num_outputs), logit=0.0)
        self.w_noise = nn.Linear(in_channels, num_outputs)
        with torch.no_grad():
            self.w_gate.bias[list(closed)] = -6.0
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
        for child_name, child in block.named_children():
            self.add_module(child_name, child)
        object.__setattr__(self, "_block", block)
        self.adapter = adapter
        self.num_experts, self.k = config.num_experts, config.k
        self.skip_expert, self.noisy, self.capacity_factor = config.skip_expert, config.noisy, config.capacity_factor
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
        closed = (config.num_experts,) if config.skip_expert else ()
        self.router = NoisyTopKRouter(c_in, config.num_experts + int(config.skip_expert), closed)

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

    def route(self, x: Tensor) -> tuple[Decision, Tensor, Tensor]:
        """Route a batch.

        Returns:
            ``(decision, index, weight)``: the decision (``hard`` Tensor[N, E'] 0/1 selection, straight-through
            in training, ``soft`` the gates), Tensor[N, k] experts (``-1`` for the skip expert or a dropped
            choice) and Tensor[N, k] their weights.
        """
        noisy = self.noisy and self.training
        clean, noise_std = self.router(x, noisy)
        gates, index, logits = noisy_top_k_gating(clean, noise_std, self.k)
        weight = gates.gather(1, index)
        routed = index < self.num_experts
        if self.capacity_factor is not None:
            cap = expert_capacity(x.shape[0], self.num_experts, self.k, self.capacity_factor)
            routed = routed & capacity_keep(index, self.num_experts, cap)
        index = torch.where(routed, index, torch.full_like(index, -1))
        selected = torch.zeros_like(gates).scatter_add(1, index.clamp(min=0), routed.to(gates.dtype))
        kept_gates = gates * selected
        t = current_trace()
        if t is not None and self.training:
            real = slice(0, self.num_experts)
            aux = self.importance_weight * importance_loss(gates[:, real])
            if noise_std is not None:
                p = prob_in_top_k(clean, logits, noise_std, self.k)
                aux = aux + self.load_weight * cv_squared(p[:, real].sum(0))
            t.add_loss(f"{self.block_name}/balance", aux)
        decision = Decision(hard=straight_through(selected, kept_gates), soft=gates, granularity="expert")
        return decision, index, weight * routed.to(weight.dtype)

    # -- modes ----------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor) -> Tensor:
        return self.post(self.shortcut(x) + self.expert(0, x))

    def forward_masked(self, x: Tensor) -> Tensor:
        d, index, _ = self.route(x)
        gates = d.hard * d.soft  # straight-through selection × gate value: the kept gates
        out = self.post(dense_combine(self._expert_fns(), x, gates, self.shortcut(x)))
        self._record(x, d, index, sparse=False)
        return out

    def forward_sparse(self, x: Tensor) -> Tensor:
        d, index, weight = self.route(x)
        out = self.post(dispatch_add(self._expert_fns(), x, index, weight, self.shortcut(x)))
        self._record(x, d, index, sparse=True)
        return out

    # -- bookkeeping ----------------------------------------------------------------------------
    def _record(self, x: Tensor, d: Decision, index: Tensor, *, sparse: bool) -> None:
        t = current_trace()
        if t is None:
            return
        n = x.shape[0]
        t.record_decision(self.block_name, d)
        t.record_output(f"{self.block_name}/load", expert_counts(index, self.num_experts))
        body = self.cost("expert", lambda m, inp: m.expert(0, inp), x)
        used = d.hard[:, : self.num_experts].sum(1).double()
        executed = used.detach() * body if sparse else float(self.num_experts * body)
        lowest = 0 if self.capacity_factor is not None else self.k - int(self.skip_expert)
        t.record_macs(
            f"{self.block_name}/experts",
            used * body,
            executed=executed,
            minimum=lowest * body,
            maximum=min(self.k, self.num_experts) * body,
            dense=body,
        )
        noisy = self.noisy and self.training
        g = self.cost(f"router{int(noisy)}", lambda m, inp: m.router(inp, noisy), x)
        t.record_macs(f"{self.block_name}/router", float(g), batch_size=n, minimum=g, maximum=g)


class SparseMoE(DynamicModel):
    """The converted network; objective: cross-entropy + balancing losses (+ MAC budget when ``budget`` is set)."""


def convert(model: nn.Module, config: SparseMoEConfig, targets: Targets = "auto") -> SparseMoE:
    """Turn every target residual block of ``model`` into a mixture of experts (in place)."""
    for name, block, adapter in residual_blocks(model, targets):
        new = MoEResidual(block, adapter, config)
        new.block_name = name
        replace_module(model, name, new)
    return SparseMoE(model, recipe="sparse_moe", config=copy.copy(config), in_channels=first_conv_in_channels(model))


SPEC = register_recipe(
    RecipeSpec(
        name="sparse_moe",
        family="moe",
        config_cls=SparseMoEConfig,
        convert=convert,
        paper="Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer (ICLR 2017), "
        "arXiv:1701.06538",
    )
)
