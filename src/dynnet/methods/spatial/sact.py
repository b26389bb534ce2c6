"""SACT — Figurnov, Collins, Zhu, Zhang, Huang, Vetrov & Salakhutdinov, "Spatially Adaptive Computation Time
for Residual Networks", CVPR 2017. https://openaccess.thecvf.com/content_cvpr_2017/html/Figurnov_Spatially_Adaptive_Computation_CVPR_2017_paper.html
(arXiv:1612.02297).

Adaptive computation time (Graves 2016) applied per spatial position within each ResNet stage. After
every residual block ``l`` of a stage but the last, a halting unit emits ``h_l(i, j) ∈ (0, 1)`` (a 3×3
convolution to one channel plus a global-average-pool linear term, sigmoid). A position halts at the first
block ``N(i, j)`` where the cumulative halting score reaches ``1 - ε``; later blocks of the stage are
computed only at the positions still running (their features at halted positions are copied: the block
adds nothing there). The stage output is the ACT mixture ``Σ_l p_l(i, j) x_l(i, j)`` with ``p_l = h_l``
before halting and the remainder ``R = 1 - Σ_{l<N} h_l`` at ``N``, and the ponder cost ``ρ = N + R``
(gradient through ``R``) is added to the loss with weight ``ponder_weight``.

Sparse mode runs each block on its active positions with the pixel gather–GEMM–scatter engine
(:func:`dynnet.kernels.chain.run_pixels`): the first convolution on the positions the second
reads (dilated mask), the second on the running positions.

Departures from the paper:
* the ponder cost is averaged over positions (and summed over stages) instead of summed over positions,
  so ``ponder_weight`` does not depend on the resolution;
* halting units are evaluated densely (at every position, halted or not: 9·C MACs per position, counted);
  the paper evaluates them at active positions only;
* the first block of each stage always runs at every position (as in the paper, where the first unit of
  ACT always runs; it is also the block that changes resolution);
* because the output is the ACT mixture of block outputs, a fresh conversion does not reproduce the base
  network exactly (``reproduces_base=False``); halting biases start at -3 (the paper's initialisation), so
  the mixture is 90 % the last block's output at step 0 and no position halts early;
* the objective adds a MAC-budget term to the ponder cost (below).

Budget: trained and calibrated. ``budget`` (the target fraction of the dense MACs, halting units included) is the
target of a MAC-budget loss (weight ``budget_weight``) added to the paper's ponder cost: the MACs are exact, and
their gradient is taken through the ACT remainders ``R`` as the ponder cost's is (an entry ``<stage>/remainder``
of value 0 whose gradient is ``-(cost of one block at a position)`` per halting score before halting), so the
term pulls the halting units both ways. The paper's own knob, the ponder weight τ, stays a setting (it has no
closed-form relation to the MACs). Calibration moves the halting threshold of every position by one offset on the
halting units' logits (``h = σ(z - offset)``: the bias of each unit's 3×3 convolution, which the compiled
``squeeze_logits`` path reads too; kept in ``calibration[0]``): a positive offset halts later and spends more.
It reaches the whole range, where moving ε only reaches what ``ε → 0`` spends, and keeps the ACT weights
convex. Reachable: 0.35–1.0 on a ResNet-20 (the first block of every stage and the stem always run).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynnet.blocks import spatial_chain
from dynnet.convert import Targets, find_adapter, first_conv_in_channels, replace_module
from dynnet.core import Decision, DynamicBlock, DynamicModel, current_trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.estimators.ponder import halts
from dynnet.kernels.chain import chain_sizes, run_masked, run_pixels, stage_masks
from dynnet.kernels.spatial import scatter_add_rows
from dynnet.methods.spatial.gates import SqueezeMaskUnit

__all__ = ["SACT", "SACTConfig", "SACTStage", "act_step"]


@dataclass(frozen=True)
class SACTConfig:
    """Settings of SACT.

    Attributes:
        budget: target mean fraction of the dense MACs per image, halting units included; the target of the
            MAC-budget loss and of calibration.
        ponder_weight: τ, weight of the ponder cost (the paper sweeps 0.001–0.1).
        budget_weight: weight of the MAC-budget loss (0: the paper's objective alone; calibration still hits the
            budget).
        eps: ACT's ε (0.01 in the paper).
        halting_bias: initial bias of the halting units (-3 in the paper).
    """

    budget: float = 0.6
    ponder_weight: float = 0.01
    budget_weight: float = 1.0
    eps: float = 0.01
    halting_bias: float = -3.0

    def __post_init__(self) -> None:
        if not self.ponder_weight >= 0 or not self.budget_weight >= 0:
            raise ValueError(f"weights must be >= 0, got {self.ponder_weight}, {self.budget_weight}")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")


@dataclass(frozen=True)
class ActState:
    """Per-position ACT state of one stage, passed explicitly from block to block.

    Attributes:
        cumulative: Tensor[N, H, W] sum of the halting scores of the blocks run so far (before halting).
        running: Tensor[N, H, W] bool, positions that have not halted.
        output: Tensor[N, C, H, W] the mixture ``Σ p_l x_l`` so far.
        steps: Tensor[N, H, W] number of blocks run at each position.
        remainder: Tensor[N, H, W] ``R`` of the positions that halted (0 elsewhere).
    """

    cumulative: Tensor
    running: Tensor
    output: Tensor
    steps: Tensor
    remainder: Tensor


def act_step(state: ActState | None, x: Tensor, h: Tensor | None, eps: float) -> ActState:
    """One ACT update per position after a block with output ``x`` (Tensor[N, C, H, W]).

    Args:
        state: the state before this block (``None`` for the first block).
        x: the block's output.
        h: Tensor[N, H, W] halting scores after this block, or ``None`` for the last block (halts everywhere).
        eps: ACT's ε.
    """
    if state is None:
        zeros = x.new_zeros((x.shape[0], *x.shape[2:]))
        state = ActState(zeros, torch.ones_like(zeros, dtype=torch.bool), torch.zeros_like(x), zeros, zeros)
    running = state.running
    stop = running if h is None else running & halts(state.cumulative, h, eps)
    r = 1.0 - state.cumulative
    h_eff = torch.zeros_like(r) if h is None else h
    p = torch.where(stop, r, torch.where(running, h_eff, torch.zeros_like(r)))
    return ActState(
        cumulative=state.cumulative + torch.where(running & ~stop, h_eff, torch.zeros_like(r)),
        running=running & ~stop,
        output=state.output + p.unsqueeze(1) * x,
        steps=state.steps + running.to(x.dtype),
        remainder=torch.where(stop, r, state.remainder),
    )


class SACTStage(DynamicBlock):
    """A ResNet stage (sequence of residual blocks) with spatially adaptive computation time.

    Args:
        stage: the original ``nn.Sequential`` of residual blocks (children keep their names ``0, 1, ...``).
        in_channels: channels of each block's output (the halting units' input).
        config: :class:`SACTConfig`.

    The halting units are ``gates.0 … gates.{L-2}`` (named ``gates`` so that base state dicts load).
    """

    granularity = "spatial"

    def __init__(self, stage: nn.Sequential, channels: int, config: SACTConfig) -> None:
        super().__init__()
        blocks = list(stage.children())
        for name, child in stage.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_blocks", blocks)
        self._adapters = [find_adapter(b) for b in blocks]
        object.__setattr__(self, "_chains", [spatial_chain(b) for b in blocks])
        self.gates = nn.ModuleList(
            SqueezeMaskUnit(channels, 1, open_logit=config.halting_bias) for _ in range(len(blocks) - 1)
        )
        self.eps = config.eps
        self.ponder_weight = config.ponder_weight

    def forward_dense(self, x: Tensor) -> Tensor:
        for b in self._blocks:
            x = b(x)
        return x

    def forward_masked(self, x: Tensor) -> Tensor:
        return self._run(x, sparse=False)

    def forward_sparse(self, x: Tensor) -> Tensor:
        return self._run(x, sparse=True)

    def _block(self, i: int, x: Tensor, running: Tensor, sparse: bool) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """Block ``i`` computed at the running positions: (output, stage masks, executed MACs or None)."""
        b, a, stages = self._blocks[i], self._adapters[i], self._chains[i]
        sizes = chain_sizes(stages, tuple(x.shape[2:]))
        base = a.shortcut(b, x)
        if not sparse:
            masks = stage_masks(stages, running.to(x.dtype), sizes[1:])
            return a.post(b, base + run_masked(stages, x, list(masks))), masks, None
        masks = stage_masks(stages, running, sizes[1:])
        if not bool(masks[0].any()):
            return a.post(b, base), masks, torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        rows, positions, executed = run_pixels(stages, x, masks)
        return a.post(b, scatter_add_rows(base, rows, positions)), masks, executed

    def _run(self, x: Tensor, sparse: bool) -> Tensor:
        t = current_trace()
        x = self._blocks[0](x)
        state: ActState | None = None
        for i in range(len(self._blocks)):
            if i > 0:
                running, x_in = state.running, x
                x, masks, executed = self._block(i, x, running, sparse)
                if t is not None:
                    self._record(t, i, x_in, running, masks, executed)
            h = torch.sigmoid(self.gates[i](x)) if i < len(self._blocks) - 1 else None
            if t is not None and h is not None:
                g = self.cost(f"gate{i}", lambda m, inp, k=i: m.gates[k](inp), x)
                t.record_macs(f"{self.block_name}.{i}/gate", float(g), batch_size=x.shape[0], minimum=g, maximum=g)
            state = act_step(state, x, h, self.eps)
        if t is not None:
            ponder = (state.steps + state.remainder).flatten(1).mean(1)
            t.add_loss("ponder", self.ponder_weight * ponder.mean())
            if state.remainder.requires_grad and len(self._blocks) > 1:
                self._record_remainder(t, state.remainder)
        return state.output

    def _record_remainder(self, t, remainder: Tensor) -> None:
        """The MACs' gradient through the ACT remainders (value 0): a higher halting score before halting lowers
        ``R`` as it lowers the ponder cost, and the blocks a position runs, by one block's cost per position."""
        later = [sum(st.per_position for st in chain) for chain in self._chains[1:]]
        per_position = float(sum(later)) / len(later)
        surrogate = (remainder - remainder.detach()).flatten(1).sum(1).double() * per_position
        t.record_macs(f"{self.block_name}/remainder", surrogate, executed=0.0, minimum=0.0, maximum=0.0)

    def _record(self, t, i: int, x: Tensor, running: Tensor, masks: list[Tensor], executed: Tensor | None) -> None:
        name = f"{self.block_name}.{i}"
        t.record_decision(name, Decision(hard=running.to(x.dtype), soft=None, granularity="spatial"))
        stages = self._chains[i]
        body = self.cost(f"body{i}", lambda m, inp, k=i: m._adapters[k].body(m._blocks[k], inp), x)
        macs = sum(m.flatten(1).sum(1).double() * st.per_position for st, m in zip(stages, masks, strict=True))
        t.record_macs(
            f"{name}/body", macs, executed=body if executed is None else executed, minimum=0.0, maximum=body, dense=body
        )


class SACT(DynamicModel):
    """The converted network; its objective is cross-entropy + the ponder cost + ``budget_weight`` × the MAC-budget
    loss (:meth:`DynamicModel.compute_loss`)."""

    def budget_knob(self) -> Knob:
        """One offset subtracted from the logit of every halting unit (a positive offset halts later)."""
        return self.logit_shift_knob(
            [(g.conv.bias, None, -1.0) for _, stage in self.blocks() for g in stage.gates], lo=-30.0, hi=30.0
        )


@recipe(
    "sact",
    paper="Spatially Adaptive Computation Time for Residual Networks (CVPR 2017), arXiv:1612.02297",
    budget=BudgetPolicy("trained+calibrated", knob="halting logit offset", reachable=(0.35, 1.0),
                        derives="target of the MAC-budget loss added to the ponder cost = budget"),
    test_base="cifar_resnet20",
    reproduces_base=False,
)  # fmt: skip
def convert(model: nn.Module, config: SACTConfig, targets: Targets = "auto") -> SACT:
    """Make every stage (a Sequential of ≥ 2 residual blocks with known conv chains) spatially adaptive."""
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Sequential) or len(m) < 2:
            continue
        known = all(find_adapter(b) is not None and spatial_chain(b) is not None for b in m.children())
        chosen = targets == "auto" or (targets(name, m) if callable(targets) else name in targets)
        if known and chosen:
            found.append((name, m))
    if not found:
        raise ValueError(f"no stage of ≥ 2 known residual blocks found in {type(model).__name__}")
    for name, stage in found:
        channels = spatial_chain(list(stage.children())[-1])[-1].conv.out_channels
        new = SACTStage(stage, channels, config)
        new.block_name = name
        replace_module(model, name, new)
    return SACT(model, recipe="sact", config=copy.copy(config), in_channels=first_conv_in_channels(model))
