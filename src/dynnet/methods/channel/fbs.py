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
* the predictor starts with ``W = 0, b = 1`` (every saliency 1), so with ``budget = 1`` a fresh conversion
  reproduces the base network; ``budget`` is the density ``d`` (the default 1.0 only suppresses channels whose
  saliency is 0);
* channels with saliency exactly 0 are suppressed even when fewer than ``k`` remain (so a sample may keep < k).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels
from dynnet.core import Decision, DynamicModel, LossOutput, RecipeSpec, Trace, register_recipe
from dynnet.kernels.channel import GATE_KWTA, NativeGate
from dynnet.methods.channel._block import ChannelGatedBlock, convert_blocks

__all__ = ["FBS", "FBSBlock", "FBSConfig", "SaliencyPredictor", "winners_take_all"]


@dataclass(frozen=True)
class FBSConfig:
    """Settings of FBS.

    Attributes:
        budget: the density ``d`` of k-winners-take-all (fraction of inner channels kept per sample).
        saliency_weight: weight of the L1 penalty on the predicted saliencies (the paper's lambda).
        strategy: sparse-mode batch strategy.
    """

    budget: float = 1.0
    saliency_weight: float = 1e-4
    strategy: str = "auto"


def winners_take_all(g: Tensor, k: int) -> Tensor:
    """k-WTA: keep the ``k`` largest values of each row of Tensor[N, C] and zero the others (ties: lowest index)."""
    if not 0 < k <= g.shape[1]:
        raise ValueError(f"k must be in [1, {g.shape[1]}], got {k}")
    if k == g.shape[1]:
        return g
    # A stable sort, not topk: topk's choice among equal values is unspecified (and differs from the compiled
    # kernel's), and FBS's predictor starts with every saliency equal (zero weights, bias 1).
    idx = torch.sort(g, dim=1, descending=True, stable=True).indices[:, :k]
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, idx, True)
    return g * keep


class SaliencyPredictor(nn.Module):
    """``g = relu(W mean_{hw}|x| + b)``: Tensor[N, C_in, H, W] → Tensor[N, C] non-negative saliencies."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, channels)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(x.abs().mean((2, 3))))


class FBSBlock(ChannelGatedBlock):
    """A basic block whose inner channels are boosted or suppressed by FBS."""

    def __init__(self, *args, density: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.density = density

    @property
    def density(self) -> float:
        """The fraction of inner channels k-WTA keeps per sample."""
        return self._density

    @density.setter
    def density(self, value: float) -> None:
        self._density = float(value)
        self._plan = None  # a cached inference plan holds k

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
        return NativeGate(GATE_KWTA, w, b, w, b, self._k(), (w, b))  # gw2, gb2 are unused by k-WTA

    def _k(self) -> int:
        return max(1, math.ceil(self.density * self.channels - 1e-9))

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

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        task = F.cross_entropy(logits, target)
        decisions = list(t.decisions_of("channel").values())
        l1 = sum(d.soft.abs().sum(1).mean() for d in decisions)
        total = task + self.config.saliency_weight * l1
        return LossOutput(total, {"task": float(task.detach()), "saliency_l1": float(l1.detach())})


def convert(model: nn.Module, config: FBSConfig, targets: Targets = "auto") -> FBS:
    """Put an FBS saliency predictor on the inner channels of every target basic residual block (in place)."""

    def make(name: str, block: nn.Module, adapter) -> FBSBlock:
        new = FBSBlock(block, adapter, None, strategy=config.strategy, density=config.budget)
        new.saliency = SaliencyPredictor(adapter.in_channels(block), block.conv1.out_channels)
        return new

    convert_blocks(model, targets, make)
    return FBS(model, recipe="fbs", config=copy.copy(config), in_channels=first_conv_in_channels(model))


SPEC = register_recipe(
    RecipeSpec(
        name="fbs",
        family="channel",
        config_cls=FBSConfig,
        convert=convert,
        paper="Dynamic Channel Pruning: Feature Boosting and Suppression (ICLR 2019), arXiv:1810.05331",
    )
)
