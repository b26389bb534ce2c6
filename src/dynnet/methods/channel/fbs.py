"""Feature Boosting and Suppression — Gao, Zhao, Dudziak, Mullins & Xu, "Dynamic Channel Pruning: Feature Boosting
and Suppression", ICLR 2019. https://arxiv.org/abs/1810.05331

A saliency predictor looks at the globally pooled input of each gated convolution, ``s = mean_{hw} |x|``, and
predicts channel saliencies ``g = relu(W s + b)``; k-winners-take-all keeps the ``k = ceil(d · C)`` most salient
channels (``d`` the density) and zeroes the rest, and the kept channels are *boosted*: their output is multiplied by
their saliency. Suppressed channels are not computed (output side of ``conv1``) and not read (input side of
``conv2``). The predictor is trained jointly with the network, with an L1 penalty on ``g``.

Sparse mode folds the batch norms and runs each sample's own ``k`` channels; since k-WTA keeps the same number of
channels for every sample, the "padded" strategy of :mod:`dynnet.kernels.channel` (one grouped convolution for
the whole batch) executes exactly the theoretical MACs.

Departures from the paper:
* gating sits on the inner channels of each residual block (``conv1`` outputs = ``conv2`` inputs): the block
  outputs feed the residual stream and stay dense. So ``conv1`` skips on the output side and ``conv2`` on the
  input side; the paper gates every convolution's outputs in VGG/ResNet;
* the saliency multiplies the batch-normalised, rectified output (``g · relu(bn(conv(x)))``, equal to the paper's
  ``relu(g · bn(conv(x)))`` for ``g >= 0``) while keeping the pretrained BN scale; the paper replaces BN's ``gamma``;
* the predictor starts with ``W = 0, b = 1`` (every saliency 1), so at the default ``budget = 1`` (density 1) a
  fresh conversion reproduces the base network. At a budget below 1 it does **not**: k-WTA keeps ``k < C`` channels
  from the start — the paper's constraint, not a gate that training closes. Which ``k``: the biases are ranked by
  each channel's static importance (:meth:`~dynnet.methods.channel._block.ChannelGatedBlock.channel_importance`,
  ``1 + 0.05 · rank / (C - 1)``), recomputed when trained base weights are loaded
  (:meth:`~dynnet.core.DynamicModel.init_from_base_`), so the network starts as the base pruned without data;
* when ``fit`` anneals the budget (``TrainConfig.budget_start``, the default when fine-tuning a trained base), the
  density follows it (:meth:`FBS.follow_budget_`): gradual pruning from density 1, so the predictors learn to rank
  every channel before k-WTA drops it (the paper trains at a fixed density). Measured on the main job (ResNet-20,
  Fashion-MNIST, 1 epoch, budget 0.5): first-``k`` start 91.5 %, importance-ranked start 92.9 %, with the density
  annealed 93.5 % (docs/training.md);
* ``k = floor(d · C + phase)`` (at least 1) with a per-block phase spread over [0, 1) (1/2 for a block built alone):
  the paper's ``ceil(d · C)`` would make every block's one-channel step fall on the same densities;
* channels with saliency exactly 0 are suppressed even when fewer than ``k`` remain (so a sample may keep < k).

Budget: calibrated. ``budget`` is the target fraction of the dense MACs (the saliency predictors included); the
paper's knob, the density ``d``, is derived from it at conversion: the ``d`` whose MAC fraction on a nominal
``C × 32 × 32`` input is closest to the budget (k-WTA keeps the same ``k`` for every sample, so that fraction is
exact for inputs without zero saliencies). ``d`` is a buffer of every block's predictor (``saliency.density``), which
the compiled batch-1 call's plan is keyed on; calibration sets one ``d`` for every block until the mean MAC fraction
on held-out images equals the budget. Reachable (declared): 0.1 to 1; one channel per block costs 0.09 of a
ResNet-8 and 0.02 of a ResNet-20.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels
from dynnet.core import Decision, DynamicModel, LossOutput, Trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.kernels.channel import GATE_KWTA, NativeGate
from dynnet.methods.channel._block import ChannelGatedBlock, convert_blocks, gated_channels
from dynnet.methods.channel._budget import ROUNDING_SLACK, block_phases, derive_fraction, kept_channels, top_k_keep
from dynnet.testing.scramble import register_randomiser

__all__ = ["FBS", "FBSBlock", "FBSConfig", "SaliencyPredictor", "winners_take_all"]


@dataclass(frozen=True)
class FBSConfig:
    """Settings of FBS.

    Attributes:
        budget: target mean fraction of the dense MACs per image (the saliency predictors included). The density
            ``d`` of k-winners-take-all (the fraction of inner channels kept per sample, the paper's knob) is derived
            from it at conversion; 1.0 keeps every channel (a fresh conversion reproduces the base network only there).
        saliency_weight: weight of the L1 penalty on the predicted saliencies (the paper's lambda).
        strategy: sparse-mode batch strategy.
    """

    budget: float = 1.0
    saliency_weight: float = 1e-4
    strategy: str = "auto"


def winners_take_all(g: Tensor, k: int | Tensor) -> Tensor:
    """k-WTA: keep the ``k`` largest values of each row of Tensor[N, C] and zero the others (ties: lowest index).

    ``k`` may be a 0-dim tensor (computed from a buffer): no value leaves the device, so tracing, export and
    meta-tensor cost probes run it too.
    """
    if not isinstance(k, Tensor):
        if not 0 < k <= g.shape[1]:
            raise ValueError(f"k must be in [1, {g.shape[1]}], got {k}")
        if k == g.shape[1]:
            return g
    return g * top_k_keep(g, k)


class SaliencyPredictor(nn.Module):
    """``g = relu(W mean_{hw}|x| + b)``: Tensor[N, C_in, H, W] → Tensor[N, C] non-negative saliencies.

    Buffers:
        density: the k-WTA density ``d`` of its block (0-dim float64; saved in the state_dict).
    """

    def __init__(self, in_channels: int, channels: int, density: float = 1.0) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, channels)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.fill_(1.0)
        self.register_buffer("density", torch.tensor(float(density), dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(x.abs().mean((2, 3))))


class FBSBlock(ChannelGatedBlock):
    """A basic block whose inner channels are boosted or suppressed by FBS.

    Its ``saliency`` submodule (a :class:`SaliencyPredictor`, set by the conversion) holds the k-WTA density;
    ``k = max(1, floor(density · C + phase))``.

    Args:
        phase: the block's rounding phase in [0, 1) (the conversion spreads them over the blocks).
    """

    def __init__(self, *args, phase: float = 0.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= phase < 1.0:
            raise ValueError(f"phase must be in [0, 1), got {phase}")
        self.phase = float(phase)

    @property
    def density(self) -> float:
        """The fraction of inner channels k-WTA keeps per sample (the predictor's ``density`` buffer)."""
        return float(self.saliency.density)

    @density.setter
    def density(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {value}")
        with torch.no_grad():  # in place: the version bump makes a cached inference plan (which holds k) stale
            self.saliency.density.fill_(float(value))

    def binary_scale(self) -> bool:
        return False

    def decide(self, x: Tensor) -> tuple[Decision, Tensor]:
        pi, g = self._boosts(x)
        return Decision(hard=(pi > 0).to(x.dtype), soft=g, granularity="channel"), pi

    def sparse_scale(self, x: Tensor) -> Tensor:
        return self._boosts(x)[0]

    def native_gate(self) -> NativeGate | None:
        if type(self.saliency) is not SaliencyPredictor or self.saliency.fc.bias is None:
            return None  # a replaced predictor: its Python forward decides
        fc = self.saliency.fc
        w, b = fc.weight, fc.bias
        k = kept_channels(self.density, self.channels, self.phase)
        return NativeGate(GATE_KWTA, w, b, w, b, k, (w, b, self.saliency.density))  # gw2, gb2 are unused by k-WTA

    def _k(self) -> Tensor:
        """k as a 0-dim tensor (see :func:`~dynnet.methods.channel._budget.kept_channels`; no host sync)."""
        c = self.channels
        return (self.saliency.density * c + (self.phase + ROUNDING_SLACK)).floor().clamp(1, c)

    def _boosts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(pi, g)``: the k-WTA-masked saliencies (the channel multipliers) and the saliencies, Tensor[N, C]."""
        if self.training:
            g = self.saliency(x)
        else:  # the predictor's math without its two module calls (they cost more than its MACs at batch 1)
            fc = self.saliency.fc
            g = torch.addmm(fc.bias, x.abs().mean((2, 3)), fc.weight.t()).relu_()
        return winners_take_all(g, self._k()), g


class FBS(DynamicModel):
    """The converted network; objective: cross-entropy + ``saliency_weight`` × L1 of the saliencies."""

    def fbs_blocks(self) -> list[FBSBlock]:
        """The FBS blocks, in execution order."""
        return [b for _, b in self.blocks() if isinstance(b, FBSBlock)]

    def set_density(self, density: float) -> None:
        """Set the k-WTA density of every block (the paper's ``d``)."""
        for b in self.fbs_blocks():
            b.density = density

    def init_from_base_(self) -> None:
        """Below density 1, rank the starting biases of every untrained predictor (``W = 0``) by the loaded channels'
        static importance; a trained predictor is left as it is."""
        for b in self.fbs_blocks():
            if b.density < 1.0 and not b.saliency.fc.weight.any():
                rank_by_importance_(b)

    def follow_budget_(self, budget: float) -> None:
        """Set every block's density to the one derived from ``budget`` (as at conversion), so that an annealed
        training budget prunes gradually: the predictors learn to rank all channels before k-WTA drops them."""
        key = round(float(budget), 2)
        cache = self.__dict__.setdefault("_density_of_budget", {})
        if key not in cache:
            cache[key] = self.density_for(key)
        if self.fbs_blocks()[0].density != cache[key]:
            self.set_density(cache[key])

    def density_for(self, budget: float) -> float:
        """The k-WTA density whose MAC fraction on a nominal ``C × 32 × 32`` input is closest to ``budget`` (1 at
        budget 1; see :func:`~dynnet.methods.channel._budget.derive_fraction`)."""
        blocks = self.fbs_blocks()
        return derive_fraction(
            self, blocks, budget, lambda f, i: kept_channels(f, blocks[i].channels, blocks[i].phase), ("saliency",)
        )

    def budget_knob(self) -> Knob:
        """The k-WTA density of every block (one value; the MACs grow with it)."""
        blocks = self.fbs_blocks()
        return Knob("k-WTA density", lambda: blocks[0].density, self.set_density, 0.0, 1.0, increasing=True)

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        task = F.cross_entropy(logits, target)
        decisions = list(t.decisions_of("channel").values())
        l1 = sum(d.soft.abs().sum(1).mean() for d in decisions)
        total = task + self.config.saliency_weight * l1
        return LossOutput(total, {"task": float(task.detach()), "saliency_l1": float(l1.detach())})


@recipe(
    "fbs",
    paper="Dynamic Channel Pruning: Feature Boosting and Suppression (ICLR 2019), arXiv:1810.05331",
    budget=BudgetPolicy("calibrated", knob="k-WTA density", reachable=(0.1, 1.0),
                        derives="k-WTA density d of every block, whose MAC fraction on a nominal 32x32 input is the "
                        "budget (budget 1: d = 1)",
                        # standard profile, 2026-12-07: trained at 0.5 (93.98 %), calibrated to 0.25: 32.18 %
                        transfers=False),
)  # fmt: skip
def convert(model: nn.Module, config: FBSConfig, targets: Targets = "auto") -> FBS:
    """Put an FBS saliency predictor on the inner channels of every target residual block (in place): basic
    blocks, Bottlenecks and inverted residuals (:mod:`~dynnet.methods.channel._layout`).

    At ``budget = 1`` (the default) the predictors start with every saliency 1 and k-WTA keeps every channel, so the
    converted network reproduces the base network. At a budget below 1, k-WTA keeps only ``k < C`` channels per block
    from the start: the converted network does not reproduce the base network.
    """

    def make(name: str, block: nn.Module, adapter) -> FBSBlock:
        new = FBSBlock(block, adapter, None, strategy=config.strategy)
        new.saliency = SaliencyPredictor(adapter.in_channels(block), gated_channels(block))
        return new

    blocks = convert_blocks(model, targets, make)
    for block, phase in zip(blocks, block_phases(len(blocks)), strict=True):
        block.phase = phase
    net = FBS(model, recipe="fbs", config=copy.copy(config), in_channels=first_conv_in_channels(model))
    net.set_density(net.density_for(config.budget))
    net.init_from_base_()  # below density 1: the predictors start ranked by the converted network's weights
    return net


IMPORTANCE_SPREAD = 0.05
"""Range of the predictors' starting biases at a budget below 1: ``1 + IMPORTANCE_SPREAD · rank / (C - 1)``."""


def rank_by_importance_(block: FBSBlock) -> None:
    """Start ``block``'s predictor with biases ordered by the channels' static importance (in place).

    With ``W = 0`` every saliency is its bias, so k-WTA keeps the ``k`` channels of largest
    :meth:`~dynnet.methods.channel._block.ChannelGatedBlock.channel_importance` — the channels static pruning would
    keep — instead of the first ``k``: the converted network starts as the base pruned without data, and training
    makes the choice input-dependent. The biases stay within ``[1, 1 + IMPORTANCE_SPREAD]`` (the boost of a kept
    channel stays near 1, the base's scale).
    """
    importance = block.channel_importance()
    rank = importance.argsort(stable=True).argsort().to(importance.dtype)  # 0 for the least important
    with torch.no_grad():
        block.saliency.fc.bias.copy_(1.0 + IMPORTANCE_SPREAD * rank / max(1, len(importance) - 1))


@register_randomiser(FBS)
def _randomise(model: FBS, generator: torch.Generator) -> int:
    """Random saliency predictors (weights ``N(0, 1 / C_in)``, biases ``N(1, 0.5²)``) for the conformance suite;
    returns how many tensors changed. Every saliency varies with the input and a few are zero for some inputs (a
    trained predictor's L1 penalty zeroes some too): the generic scrambling's ``N(0, 1)`` biases would zero half of
    them for every input, leaving k-WTA nothing to choose from. The densities (the budget's knob) are kept."""
    changed = 0
    with torch.no_grad():
        for b in model.fbs_blocks():
            fc = b.saliency.fc
            fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator) / fc.weight.shape[1] ** 0.5)
            fc.bias.copy_(torch.randn(fc.bias.shape, generator=generator) * 0.5 + 1.0)
            changed += 2
    return changed
