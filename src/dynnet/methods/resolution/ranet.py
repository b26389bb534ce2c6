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
* thresholds start at ``inf`` ("open": every sample reaches the last, full-resolution exit) and are set by
  :func:`dynnet.calibrate` (or :meth:`RANet.calibrate`) from held-out confidences with MSDNet's geometric exit
  schedule;
* the exits' losses are weighted by the budget's exit profile, half and half with the paper's equal weights
  (``exit_weighting``, 0: the paper's plain sum), as MSDNet suggests when the budget is known;
* ``reproduces_base=False``: RANet is its own architecture; the converted base network only gives the number
  of input channels and classes.

Budget: calibrated. ``budget`` is the target mean fraction of the dense MACs per image (every sub-network run,
the last exit's answer). It is translated into MSDNet's geometric exit profile ``p_s ∝ q^s``: the rate ``q`` whose
expected MACs (each exit's cost weighted by the fraction of samples leaving there) are the budget. That profile
weights the exits' losses in training (``exit_weighting``), and :func:`dynnet.calibrate` sets the exit thresholds
from held-out confidences so that the exits follow the profile whose mean MAC fraction on those images is the
budget (``log q`` in ``calibration[0]``, the thresholds in the ``thresholds`` buffer). Reachable: from the first
exit alone (about 0.13-0.15 of the dense MACs) to every sub-network.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels, num_classes_of
from dynnet.core import Decision, DynamicBlock, DynamicModel, LossOutput, Trace, current_trace
from dynnet.core.budget import BudgetPolicy
from dynnet.core.recipe import recipe
from dynnet.gates import (
    confidence,
    exit_fractions_for_budget,
    exit_fractions_for_rate,
    exit_rate_for_budget,
    thresholds_for_fractions,
)
from dynnet.testing.scramble import register_randomiser

__all__ = ["RANet", "RANetBody", "RANetConfig", "SubNetwork", "convert"]


@dataclass(frozen=True)
class RANetConfig:
    """Settings of RANet.

    Attributes:
        budget: target mean fraction of the dense MACs per image; it sets the geometric exit profile that weights
            the exits' losses and that calibration fits the exit thresholds to.
        scales: down-sampling factor of each sub-network's input, coarsest first (the last is usually 1).
        widths: channels of each sub-network (its stride-2 layers use twice as many).
        exit_weighting: λ, exit ``s``'s loss weight is ``(1 - λ) + λ S p_s`` with ``p`` the budget's exit profile
            (0: the paper's equal weights; the weights always sum to ``S``).
    """

    budget: float = 0.5
    scales: tuple[int, ...] = (4, 2, 1)
    widths: tuple[int, ...] = (32, 24, 16)
    exit_weighting: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if not 0.0 <= self.exit_weighting <= 1.0:
            raise ValueError(f"exit_weighting must be in [0, 1], got {self.exit_weighting}")
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
        if t is not None and self.training:  # what the exits' loss weights are derived from
            t.record_output("ranet/exit_fractions", torch.tensor(costs, dtype=torch.float64).cumsum(0) / sum(costs))
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
    """RANet as a :class:`DynamicModel`; objective: the exits' cross-entropies, weighted by the budget's profile."""

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        budget = self.config.budget if budget is None else budget
        exits = [v for k, v in t.outputs.items() if k.startswith("exit")]
        terms = [F.cross_entropy(z, target) for z in exits] or [F.cross_entropy(logits, target)]
        weights = torch.ones(len(terms), dtype=torch.float64)
        if "ranet/exit_fractions" in t.outputs and len(terms) > 1:
            weights = self.exit_weights(t.outputs["ranet/exit_fractions"], budget)
        total = (torch.stack(terms) * weights.to(terms[0])).sum()
        parts = {f"exit{i}": float(v.detach()) for i, v in enumerate(terms)}
        return LossOutput(total, parts)

    def exit_weights(self, fractions: Tensor, budget: float) -> Tensor:
        """Tensor[S] loss weights ``(1 - λ) + λ S p_s``, ``p`` the geometric exit profile whose expected MAC fraction
        is ``budget`` given each exit's MAC fraction ``fractions`` (Tensor[S])."""
        lam = self.config.exit_weighting
        p = exit_fractions_for_budget(fractions, budget)
        return (1.0 - lam) + lam * len(p) * p

    def calibrate_to_(self, batches: list[Tensor], budget: float, tolerance: float) -> dict[str, float]:
        """Exit thresholds from the confidences on ``batches`` so that the exits follow the geometric profile whose
        mean MAC fraction on them is ``budget`` (``log q`` kept in ``calibration[0]``)."""
        body: RANetBody = self.net
        conf = torch.cat([self.exit_confidences(x) for x in batches])
        costs = torch.tensor(body.stage_costs(body.inputs(batches[0][:1])), dtype=torch.float64).cumsum(0)
        log_q, thresholds, _ = exit_rate_for_budget(conf, costs / costs[-1], budget, tolerance=tolerance)
        with torch.no_grad():
            body.thresholds.copy_(thresholds)
            self.calibration[0] = log_q
        return {"exit rate log q": log_q}

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


@recipe(
    "ranet",
    paper="Resolution Adaptive Networks for Efficient Inference (CVPR 2020), arXiv:2003.07326",
    budget=BudgetPolicy("calibrated", knob="exit thresholds (rate q of the geometric exit profile)",
                        reachable=(0.2, 1.0),
                        derives="geometric exit profile p_s ∝ q^s with expected MACs = budget; exit loss weights"),
    test_input=(1, 32, 32),
    reproduces_base=False,
)  # fmt: skip
def convert(model: nn.Module, config: RANetConfig, targets: Targets = "auto") -> RANet:
    """Build a RANet with ``model``'s input channels and classes (the base network is not reused)."""
    in_channels = first_conv_in_channels(model) or 3
    body = RANetBody(in_channels, num_classes_of(model), config)
    return RANet(body, recipe="ranet", config=copy.copy(config), in_channels=in_channels)


@register_randomiser(RANet)
def _randomise(model: RANet, generator: torch.Generator) -> int:
    """Random thresholds and sharper exits, so that samples leave at different exits (testing)."""
    with torch.no_grad():
        body: RANetBody = model.net
        for sub in body.subnets:
            sub.classifier.weight.mul_(8.0)
        body.thresholds.copy_(0.3 + 0.4 * torch.rand(body.thresholds.shape, generator=generator))
    return len(body.subnets)
