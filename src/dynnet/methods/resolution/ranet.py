"""RANet — Yang, Huang, Gao, Huang, Song, Huang, "Resolution Adaptive Networks for Efficient Inference", CVPR 2020.
https://openaccess.thecvf.com/content_CVPR_2020/papers/Yang_Resolution_Adaptive_Networks_for_Efficient_Inference_CVPR_2020_paper.pdf

A sequence of sub-networks sees the image at increasing resolutions (``scales`` are down-sampling factors,
coarsest first). Each sub-network ends in a classifier (an exit); a sample stops at the first exit whose maximum
softmax probability reaches that exit's threshold, so only hard samples pay for the high-resolution
sub-networks. Higher-resolution sub-networks fuse the features of the previous (lower-resolution) one,
up-sampled. Training minimises the sum of the exits' cross-entropies (the paper's objective). In sparse mode
samples that exit leave the batch (index_select); the following sub-networks run on the rest only.

Departures from the paper:

* a compact architecture: each sub-network is conv-BN-ReLU ×2 at its resolution, fusion by addition of the
  1×1-projected, bilinearly up-sampled features of the previous sub-network (the paper concatenates dense-block
  features at every layer), then two stride-2 conv-BN-ReLU layers, global pooling and a linear exit;
* one fusion link (sub-network s ← s-1) instead of dense cross-scale links; no within-scale early exits;
* thresholds start at ``inf`` ("open": every sample reaches the last, full-resolution exit) and are set with
  :meth:`RANet.calibrate` from held-out confidences with MSDNet's geometric exit schedule;
* ``reproduces_base=False``: RANet is its own architecture; the converted base network only gives the number
  of input channels and classes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels
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
from dynnet.gates import confidence, exit_fractions_for_rate, thresholds_for_fractions

__all__ = ["RANet", "RANetBody", "RANetConfig", "SubNetwork", "convert", "num_classes_of"]


@dataclass(frozen=True)
class RANetConfig:
    """Settings of RANet.

    Attributes:
        budget: unused by the objective (exits are set by :meth:`RANet.calibrate`); kept for the common API.
        scales: down-sampling factor of each sub-network's input, coarsest first (the last is usually 1).
        widths: channels of each sub-network (its stride-2 layers use twice as many).
    """

    budget: float | None = None
    scales: tuple[int, ...] = (4, 2, 1)
    widths: tuple[int, ...] = (32, 24, 16)

    def __post_init__(self) -> None:
        if len(self.scales) < 2 or len(self.scales) != len(self.widths):
            raise ValueError(f"need >= 2 scales and one width per scale, got {self.scales} and {self.widths}")
        if list(self.scales) != sorted(self.scales, reverse=True) or min(self.scales) < 1:
            raise ValueError(f"scales must be positive down-sampling factors, coarsest first, got {self.scales}")


def _cbr(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SubNetwork(nn.Module):
    """One resolution's sub-network: Tensor[N, C, h, w] (+ previous features) → (features, logits Tensor[N, K]).

    Args:
        in_channels: image channels.
        width: channels at this resolution.
        prev_width: channels of the previous sub-network's features, or ``None`` for the first.
        num_classes: K.
    """

    def __init__(self, in_channels: int, width: int, prev_width: int | None, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(_cbr(in_channels, width), _cbr(width, width))
        self.fuse = None if prev_width is None else nn.Conv2d(prev_width, width, 1, bias=False)
        self.reduce = nn.Sequential(_cbr(width, 2 * width, 2), _cbr(2 * width, 2 * width, 2))
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor, prev: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns ``(features Tensor[N, width, h, w], logits Tensor[N, K])``."""
        h = self.stem(x)
        if self.fuse is not None:
            if prev is None:
                raise ValueError("this sub-network fuses the previous one's features: pass them")
            h = h + F.interpolate(self.fuse(prev), size=h.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.classifier(F.adaptive_avg_pool2d(self.reduce(h), 1).flatten(1))
        return h, logits


class RANetBody(DynamicBlock):
    """The chain of sub-networks with confidence exits.

    Args:
        in_channels: image channels.
        num_classes: K.
        config: the recipe's settings.
    """

    granularity = "exit"

    def __init__(self, in_channels: int, num_classes: int, config: RANetConfig) -> None:
        super().__init__()
        self.scales = tuple(config.scales)
        widths = config.widths
        self.subnets = nn.ModuleList(
            SubNetwork(in_channels, w, widths[i - 1] if i else None, num_classes) for i, w in enumerate(widths)
        )
        self.register_buffer("thresholds", torch.full((len(widths) - 1,), float("inf")))

    def inputs(self, x: Tensor) -> list[Tensor]:
        """The image at every scale (average pooling, 0 MACs)."""
        return [x if f == 1 else F.avg_pool2d(x, f) for f in self.scales]

    def stage(self, s: int, x: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.subnets[s](x, prev)

    def stage_costs(self, xs: Sequence[Tensor]) -> list[int]:
        """Per-sample MACs of each sub-network (exit included) for the inputs ``xs`` of :meth:`inputs`."""
        costs = []
        for s in range(len(self.subnets)):
            if s == 0:
                costs.append(self.cost("stage0", lambda m, a: m.stage(0, a, None), xs[0]))
                continue
            prev_width = self.subnets[s - 1].stem[1][0].out_channels
            prev = xs[s - 1].new_empty((1, prev_width, *xs[s - 1].shape[-2:]))
            costs.append(self.cost(f"stage{s}", lambda m, a, b, s=s: m.stage(s, a, b), xs[s], prev))
        return costs

    # -- modes ----------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor) -> Tensor:
        prev, logits = None, None
        for s, xs in enumerate(self.inputs(x)):
            prev, logits = self.stage(s, xs, prev)
        return logits

    def forward_masked(self, x: Tensor) -> Tensor:
        t = current_trace()
        xs = self.inputs(x)
        n = x.shape[0]
        alive = torch.ones(n, dtype=torch.bool, device=x.device)
        out, prev, costs = None, None, self.stage_costs(xs)
        for s in range(len(xs)):
            prev, logits = self.stage(s, xs[s], prev)
            out = logits if out is None else torch.where(alive[:, None], logits, out)
            self._record(t, s, alive, costs[s], executed=torch.full((n,), float(costs[s]), dtype=torch.float64))
            if s < len(xs) - 1:
                alive = alive & ~(confidence(logits) >= self.thresholds[s])
                self._decide(t, s, alive, x.dtype)
            if t is not None:
                t.record_output(f"exit{s}", logits)
        return out

    def forward_sparse(self, x: Tensor) -> Tensor:
        t = current_trace()
        xs = self.inputs(x)
        n = x.shape[0]
        idx = torch.arange(n, device=x.device)  # samples still running
        out, prev, costs = None, None, self.stage_costs(xs)
        for s in range(len(xs)):
            alive = torch.zeros(n, dtype=torch.bool, device=x.device).index_fill(0, idx, True)
            if idx.numel() > 0:  # samples that exited leave the batch: later sub-networks skip them
                xin = xs[s] if idx.numel() == n else xs[s].index_select(0, idx)
                prev, logits = self.stage(s, xin, prev)
                out = logits if out is None else out.index_copy(0, idx, logits)
            self._record(t, s, alive, costs[s], executed=alive.double() * costs[s])
            if s < len(xs) - 1:
                if idx.numel() > 0:
                    stay = ~(confidence(logits) >= self.thresholds[s])
                    idx, prev = idx[stay], prev[stay]
                alive = torch.zeros(n, dtype=torch.bool, device=x.device).index_fill(0, idx, True)
                self._decide(t, s, alive, x.dtype)
        return out

    # -- bookkeeping ----------------------------------------------------------------------------
    def _record(self, t: Trace | None, s: int, alive: Tensor, cost: int, executed: Tensor) -> None:
        if t is None:
            return
        t.record_macs(
            f"stage{s}",
            alive.double() * cost,
            executed=executed,
            minimum=cost if s == 0 else 0.0,
            maximum=cost,
            dense=cost,
        )

    def _decide(self, t: Trace | None, s: int, alive: Tensor, dtype: torch.dtype) -> None:
        if t is not None:
            t.record_decision(f"exit{s}", Decision(hard=alive.to(dtype), soft=None, granularity="exit"))


class RANet(DynamicModel):
    """RANet as a :class:`DynamicModel`; objective: the sum of the exits' cross-entropies."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        exits = [v for k, v in t.outputs.items() if k.startswith("exit")]
        terms = [F.cross_entropy(z, target) for z in exits] or [F.cross_entropy(logits, target)]
        total = torch.stack(terms).sum()
        parts = {f"exit{i}": float(v.detach()) for i, v in enumerate(terms)}
        return LossOutput(total, parts)

    @torch.no_grad()
    def exit_confidences(self, x: Tensor) -> Tensor:
        """Tensor[N, S] confidence of every exit (all sub-networks run)."""
        body: RANetBody = self.net
        xs, prev, conf = body.inputs(x), None, []
        for s in range(len(xs)):
            prev, logits = body.stage(s, xs[s], prev)
            conf.append(confidence(logits))
        return torch.stack(conf, 1)

    def calibrate(self, confidences: Tensor, q: float) -> Tensor:
        """Set the thresholds from held-out confidences (Tensor[N, S]) so exits follow ``p_s ∝ q^s``."""
        thr = thresholds_for_fractions(confidences, exit_fractions_for_rate(confidences.shape[1], q))
        self.net.thresholds.copy_(thr)
        return thr

    def scramble_(self, generator: torch.Generator) -> int:
        """Random thresholds and sharper exits, so that samples leave at different exits (testing)."""
        with torch.no_grad():
            body: RANetBody = self.net
            for sub in body.subnets:
                sub.classifier.weight.mul_(8.0)
            body.thresholds.copy_(0.3 + 0.4 * torch.rand(body.thresholds.shape, generator=generator))
        return len(body.subnets)


def num_classes_of(model: nn.Module) -> int:
    """Output features of the last linear layer of ``model`` (its number of classes)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot find the number of classes of {type(model).__name__}: it has no nn.Linear")
    return linears[-1].out_features


def convert(model: nn.Module, config: RANetConfig, targets: Targets = "auto") -> RANet:
    """Build a RANet with ``model``'s input channels and classes (the base network is not reused)."""
    in_channels = first_conv_in_channels(model) or 3
    body = RANetBody(in_channels, num_classes_of(model), config)
    return RANet(body, recipe="ranet", config=copy.copy(config), in_channels=in_channels)


SPEC = register_recipe(
    RecipeSpec(
        name="ranet",
        family="resolution",
        config_cls=RANetConfig,
        convert=convert,
        paper="Resolution Adaptive Networks for Efficient Inference (CVPR 2020), arXiv:2003.07326",
        test_input=(1, 32, 32),
        reproduces_base=False,
    )
)
