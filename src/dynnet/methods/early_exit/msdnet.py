"""MSDNet — Huang, Chen, Li, Wu, van der Maaten & Weinberger, "Multi-Scale Dense Networks for Resource
Efficient Image Classification", ICLR 2018. https://arxiv.org/abs/1703.09844

A network built for early exits: feature maps are kept at several scales at once, every layer concatenates
new features to its input (dense connectivity in depth) and receives a strided ("diagonal") convolution of the
finer scale; classifiers read the coarsest scale after every block, so early classifiers see coarse, high-level
features. The finest scales are dropped as depth grows (with 1×1 transition layers). Training: the sum of every
classifier's cross-entropy. Inference (budgeted batch classification): a sample stops at the first classifier
whose maximum softmax reaches its threshold; thresholds come from a geometric exit profile fitted on a
validation split (:mod:`dynnet.methods.early_exit.calibration`).

``msdnet_tiny`` (registered as a base model) is a small MSDNet for 28×28 / 32×32 inputs: 3 scales, 4 blocks.
Its plain ``forward`` is the last classifier (the static network); the recipe ``msdnet`` turns its intermediate
classifiers into exits, so open gates (thresholds at "never exit") reproduce the static network.

Departures from the paper:
* much smaller: 3 scales with 8/16/32 initial channels and growth 4/8/16, blocks of 1–2 layers, classifiers of
  two 3×3 convs of 32 channels (the paper's CIFAR model has 3 scales, 6/12/24 growth and 128-channel heads);
* scales are dropped at fixed blocks (3 → 3 → 2 → 1 scales), with a compressing transition (×0.5) at every drop;
* no test-time grouping by batch: the sparse mode compacts the batch as samples exit;
* the classifiers' loss weights are derived from the budget (the paper weights them all 1; pass
  ``exit_weights=(1, 1, 1, 1)`` for that).

Budget: calibrated. ``budget`` (the target mean fraction of the static network's MACs per image) is the budget of
the paper's budgeted batch classification: :func:`dynnet.calibrate` fits the exit thresholds with the geometric exit
profile ``q_k ∝ p^k`` until the mean MAC fraction on held-out images equals it. It also sets the classifiers' loss
weights when ``exit_weights`` is ``None``: ``w_k = (1 + K q_k) / 2``, ``q_k`` the share of images classifier ``k``
serves at the budget (:func:`~dynnet.methods.early_exit._common.budget_exit_weights`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynnet.convert import Targets
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.methods.early_exit._cascade import ExitCascade
from dynnet.methods.early_exit._common import State
from dynnet.methods.early_exit._model import EarlyExitModel
from dynnet.methods.early_exit._trunk import Trunk
from dynnet.methods.early_exit.calibration import operating_points
from dynnet.models import MODELS

__all__ = ["MSDNet", "MSDNetCascade", "MSDNetConfig", "convert", "msdnet_tiny"]


def _conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class _Branch(nn.Sequential):
    """1×1 bottleneck (4·g channels) then 3×3 (stride 1 or 2) to ``g`` channels, each conv-BN-ReLU."""

    def __init__(self, c_in: int, growth: int, stride: int) -> None:
        super().__init__(_conv_bn(c_in, 4 * growth, 1), _conv_bn(4 * growth, growth, 3, stride))


class MSDLayer(nn.Module):
    """One multi-scale dense layer: tuple of Tensor[N, C_s, H_s, W_s] (finest first) → the same, wider.

    Output scale ``s`` = concat(x_s, regular(x_s), diagonal(x_{s-1})) — the diagonal (strided) term when the
    finer scale is in the input. ``out_scales`` may drop the finest input scales.
    """

    def __init__(self, channels: Sequence[int], growth: Sequence[int], in_scales: int, out_scales: int) -> None:
        super().__init__()
        self.in_scales, self.out_scales = in_scales, out_scales
        offset = in_scales - out_scales
        self.regular = nn.ModuleList()
        self.diagonal = nn.ModuleList()
        for j in range(out_scales):
            i = offset + j
            self.regular.append(_Branch(channels[i], growth[i] // 2 if i > 0 else growth[i], 1))
            if i > 0:
                self.diagonal.append(_Branch(channels[i - 1], growth[i] // 2, 2))
            else:
                self.diagonal.append(nn.Identity())

    def forward(self, xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        offset = self.in_scales - self.out_scales
        out = []
        for j in range(self.out_scales):
            i = offset + j
            parts = [xs[i], self.regular[j](xs[i])]
            if i > 0:
                parts.append(self.diagonal[j](xs[i - 1]))
            out.append(torch.cat(parts, 1))
        return tuple(out)


class _Transition(nn.Module):
    """1×1 conv-BN-ReLU per scale, compressing channels."""

    def __init__(self, channels: Sequence[int], out: Sequence[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_conv_bn(c, o, 1) for c, o in zip(channels, out, strict=True))

    def forward(self, xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(conv(x) for conv, x in zip(self.convs, xs, strict=True))


class _Stem(nn.Module):
    """Tensor[N, C, H, W] → one map per scale (conv at the finest, strided convs to the coarser)."""

    def __init__(self, in_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        convs, c = [], in_channels
        for s, c_out in enumerate(channels):
            convs.append(_conv_bn(c, c_out, 3, 1 if s == 0 else 2))
            c = c_out
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out = []
        for conv in self.convs:
            x = conv(x)
            out.append(x)
        return tuple(out)


class _Classifier(nn.Module):
    """Two 3×3 conv-BN-ReLU (the second strided), global pool, linear: coarsest map → logits Tensor[N, K]."""

    def __init__(self, c_in: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c_in, width, 3, 1), _conv_bn(width, width, 3, 2))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x).mean((2, 3)))


class MSDNet(nn.Module):
    """A multi-scale dense network with a classifier after every block.

    Args:
        num_classes: classes.
        in_channels: input channels.
        channels: initial channels per scale (finest first).
        growth: channels each layer adds per scale.
        layers: layers per block (the stem is part of the first block).
        scales: scales kept in each block (non-increasing).
        head_width: channels of the classifiers' convs.

    ``forward`` returns the last classifier's logits, Tensor[N, num_classes].
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        channels: Sequence[int] = (8, 16, 32),
        growth: Sequence[int] = (4, 8, 16),
        layers: Sequence[int] = (1, 2, 2, 2),
        scales: Sequence[int] = (3, 3, 2, 1),
        head_width: int = 32,
    ) -> None:
        super().__init__()
        if len(layers) != len(scales) or list(scales) != sorted(scales, reverse=True) or scales[0] > len(channels):
            raise ValueError(f"bad MSDNet layout: layers {layers}, scales {scales}, channels {channels}")
        n_scales = len(channels)
        ch = list(channels)
        self.stem = _Stem(in_channels, channels)
        blocks, classifiers, current = [], [], n_scales
        for n_layers, keep in zip(layers, scales, strict=True):
            mods: list[nn.Module] = []
            for layer in range(n_layers):
                out_scales = keep if layer == 0 else current
                mod = MSDLayer(ch, growth, current, out_scales)
                offset = current - out_scales
                ch = [
                    ch[offset + j] + (growth[offset + j] if offset + j == 0 else 2 * (growth[offset + j] // 2))
                    for j in range(out_scales)
                ]
                growth = list(growth[offset:])
                mods.append(mod)
                current = out_scales
                if offset:  # a scale was dropped: compress
                    out = [max(1, c // 2) for c in ch]
                    mods.append(_Transition(ch, out))
                    ch = out
            blocks.append(nn.Sequential(*mods))
            classifiers.append(_Classifier(ch[-1], head_width, num_classes))
        self.blocks = nn.ModuleList(blocks)
        self.classifiers = nn.ModuleList(classifiers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _unit(self, b: int) -> object:
        if b == 0:
            return lambda x: self.blocks[0](self.stem(x))
        return self.blocks[b]

    def exit_trunk(self) -> Trunk:
        """Units = blocks (the stem joins the first); exits = the classifiers after each block."""
        return Trunk(
            units=tuple(self._unit(b) for b in range(len(self.blocks))),
            head=lambda h: self.classifiers[-1](h[-1]),
            names=tuple(f"blocks.{b}" for b in range(len(self.blocks))),
            exit_heads=dict(enumerate(self.classifiers[:-1])),
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks[0](self.stem(x))
        for block in self.blocks[1:]:
            h = block(h)
        return self.classifiers[-1](h[-1])


def msdnet_tiny(**kwargs: object) -> MSDNet:
    """The small MSDNet of :class:`MSDNet`'s defaults (about 4 M MACs at 28×28)."""
    return MSDNet(**kwargs)  # type: ignore[arg-type]


MODELS.register("msdnet_tiny", msdnet_tiny)


@dataclass(frozen=True)
class MSDNetConfig:
    """Settings of MSDNet.

    Attributes:
        budget: target mean fraction of the static network's MACs per image: the exit thresholds are calibrated to
            it, and it sets the loss weights when ``exit_weights`` is ``None``.
        exit_weights: loss weight of every classifier, last one last (``None``: derived from the budget,
            ``(1 + K q_k) / 2`` with ``q_k`` the share of images classifier ``k`` serves at the budget; the paper
            uses all 1).
    """

    budget: float = 0.5
    exit_weights: tuple[float, ...] | None = None


class MSDNetCascade(ExitCascade):
    """The network's own classifiers are the exits; the score is the maximum softmax probability."""

    def exit_logits(self, k: int, h: State, carry: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self.classifiers[k](h[-1]), carry


def _cascade(model: nn.Module, cls: type[MSDNetCascade], **kw: object) -> MSDNetCascade:
    if not isinstance(model, MSDNet):
        raise TypeError(f"this recipe converts an MSDNet (create_model('msdnet_tiny')), got {type(model).__name__}")
    trunk = model.exit_trunk()
    return cls(model, trunk, list(range(len(trunk.units) - 1)), [], **kw)


@recipe(
    "msdnet",
    paper="Multi-Scale Dense Networks for Resource Efficient Image Classification (ICLR 2018), arXiv:1703.09844",
    budget=BudgetPolicy(
        "calibrated",
        knob="exit thresholds (geometric exit profile)",
        reachable=(0.3, 1.0),
        derives="maximum-softmax thresholds of the classifiers (calibration); loss weights (1 + K q_k) / 2",
    ),
    test_base="msdnet_tiny",
    bench_metrics=operating_points,  # the exits' accuracy and operating points in `dynnet bench`
)
def convert(model: nn.Module, config: MSDNetConfig, targets: Targets = "auto") -> EarlyExitModel:
    """Turn the classifiers of an :class:`MSDNet` into exits (in place). ``targets`` is unused."""
    cascade = _cascade(model, MSDNetCascade)
    in_channels = model.stem.convs[0][0].in_channels
    return EarlyExitModel(cascade, recipe="msdnet", config=copy.copy(config), in_channels=in_channels)
