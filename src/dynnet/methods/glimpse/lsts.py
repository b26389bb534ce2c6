"""LSTS — Jiang, Liu, Yang, Liu, Gao, Zhang, Xiang, Pan, "Learning Where to Focus for Efficient Video Object
Detection" (Learnable Spatio-Temporal Sampling), ECCV 2020. https://arxiv.org/abs/1911.05253

LSTS propagates features between video frames without optical flow: it samples the features of one frame at
``K`` learnable locations around each position (randomly initialised, read with bilinear interpolation, so the
locations are updated by back-propagation of the detection loss through the interpolation), measures the
similarity of the embedded sampled features with the embedded features of the current frame, normalises the
similarities with a softmax and aggregates the sampled features with these weights. Expensive features are
computed only sparsely (on key frames); cheap features elsewhere.

Adaptation to image classification (departures from the paper):

* the "current frame" is a cheap view of the image: a small CNN (``coarse``) on a ``coarse_scale``-times
  down-sampled copy gives a coarse feature map; the "other frame's features" are expensive features of
  high-resolution patches: the converted base network (without its classifier) runs on ``patch_size``-pixel
  crops centred at the ``K = grid × grid`` sampling locations. Only these patches go through the expensive
  network, which is where LSTS's saving comes from (it runs the expensive network only on key frames);
* sampling locations: a ``grid × grid`` grid of patch centres moved by offsets ``tanh(W f_n + b)`` (at most
  ``max_offset`` grid cells) predicted from the coarse feature ``f_n`` sampled at each grid point (``policy``).
  The bias ``b`` plays the part of LSTS's learned, input-independent locations (initialised at the grid, ``b = 0``,
  rather than at random); ``W`` (also 0 at start) makes *where to look* a per-input decision. The crops are
  bilinear (``grid_sample``), so the offsets are trained by the task loss through the interpolation, as in LSTS
  (no REINFORCE);
* aggregation: the query is an embedding of the coarse token (the mean coarse feature lifted to the fine
  features' width), the keys are embeddings of the patch features and of the coarse token, the weights are the
  softmax of their scaled dot products over the coarse token and the kept patches, and the weighted sum of the
  features is classified. The coarse token is always part of the sum, so an image with no patch still gets a
  prediction;
* how many of the ``K`` locations to compute is a per-input decision added here (LSTS always samples all of
  them): a ``gate`` reads the coarse feature at each location and keeps or drops its patch (Gumbel-sigmoid with
  the straight-through estimator in training, ``logit > 0`` at inference; starts open), trained by the task loss
  through the aggregation weights and the MAC-budget loss (``budget``). In sparse mode only the kept patches are
  cropped and encoded; masked mode encodes all ``K`` and gives the dropped ones weight 0;
* one image, no temporal propagation: LSTS's sparsely recursive feature updating and dense feature aggregation
  between key frames have no counterpart;
* ``reproduces_base=False``: the classifier reads aggregated patch features; dense mode runs every location's
  patch (no gate evaluated).

Budget: trained and calibrated. ``budget`` is the target mean fraction of the dense MACs per image (the coarse view,
every location's patch and the head). It is the target of the MAC-budget loss on the keep gates
(``budget_weight``), which sets how many of the ``K`` patches an image gets on average (LSTS itself always samples
all ``K``); calibration then adds one offset to every keep logit (``calibration[0]``, kept in the gate's bias) until
the mean MAC fraction on held-out images equals the budget. Reachable: from the coarse view and the head alone (a
few per cent of the dense MACs) to every patch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, classifier_of, first_conv_in_channels, replace_module
from dynnet.core import Decision, DynamicBlock, DynamicModel, Trace, current_trace
from dynnet.core.budget import BudgetPolicy, Knob, LogitShift
from dynnet.core.recipe import recipe
from dynnet.estimators.gumbel import gumbel_sigmoid
from dynnet.gates import open_bias_
from dynnet.methods.glimpse._common import crop_glimpse

__all__ = ["LSTS", "LSTSConfig", "LearnableSampling", "convert", "grid_points", "sample_at", "similarity_aggregate"]


@dataclass(frozen=True)
class LSTSConfig:
    """Settings of LSTS.

    Attributes:
        budget: target mean fraction of the dense MACs per image: the target of the MAC-budget loss that trains the
            keep gates and of calibration (the keep-logit offset).
        budget_weight: weight of the MAC-budget loss (0: the gates learn from the task loss only).
        grid: the initial sampling locations form a ``grid × grid`` grid (K = grid²).
        patch_size: side of the high-resolution patches in input pixels.
        max_offset: largest offset of a location from its grid point, in grid cells.
        coarse_scale: down-sampling factor of the cheap view.
        coarse_width: channels inside the coarse network.
        coarse_features: channels of the coarse feature map.
        embed: width of the similarity embeddings.
    """

    budget: float = 0.5
    budget_weight: float = 1.0
    grid: int = 3
    patch_size: int = 16
    max_offset: float = 0.5
    coarse_scale: int = 2
    coarse_width: int = 16
    coarse_features: int = 32
    embed: int = 32

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.budget_weight < 0:
            raise ValueError(f"budget_weight must be >= 0, got {self.budget_weight}")
        if self.grid < 1 or self.patch_size < 1 or self.coarse_scale < 1 or self.embed < 1:
            raise ValueError(
                f"grid, patch_size, coarse_scale and embed must be >= 1, got {self.grid}, {self.patch_size}, "
                f"{self.coarse_scale}, {self.embed}"
            )
        if self.max_offset < 0:
            raise ValueError(f"max_offset must be >= 0, got {self.max_offset}")


def grid_points(grid: int, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """Centres of a ``grid × grid`` partition of the image, Tensor[grid², 2] ``(x, y)`` in ``[-1, 1]``, row-major."""
    c = (2 * torch.arange(grid, dtype=dtype, device=device) + 1) / grid - 1
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([gx.flatten(), gy.flatten()], 1)


def sample_at(feature_map: Tensor, points: Tensor) -> Tensor:
    """Bilinear reads of Tensor[N, C, H, W] at Tensor[N, K, 2] normalised points → Tensor[N, K, C] (0 MACs)."""
    out = F.grid_sample(feature_map, points.unsqueeze(2), mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(3).transpose(1, 2)


def similarity_aggregate(values: Tensor, keys: Tensor, query: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """LSTS's aggregation: softmax of the query–key similarities over the kept entries, weighted sum of the values.

    Args:
        values: Tensor[N, M, D] features (dropped entries may hold anything finite).
        keys: Tensor[N, M, E] their embeddings.
        query: Tensor[N, E].
        keep: Tensor[N, M] 0/1 (may be straight-through); every row keeps at least one entry.

    Returns:
        ``(aggregated Tensor[N, D], weights Tensor[N, M])``; the weights of a row sum to 1 and are 0 where dropped.
    """
    scores = torch.bmm(keys, query.unsqueeze(2)).squeeze(2) / math.sqrt(keys.shape[-1])
    # Shift by the largest kept score (the same in masked and sparse mode); dropped scores are clamped so that
    # their exp stays finite and `keep = 0` zeroes them while still passing the straight-through gradient.
    shift = scores.detach().masked_fill(keep.detach() < 0.5, float("-inf")).amax(1, keepdim=True)
    e = keep * torch.exp((scores - shift).clamp(max=30.0))
    weights = e / e.sum(1, keepdim=True)
    return torch.bmm(weights.unsqueeze(1), values).squeeze(1), weights


def _cbr(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class LearnableSampling(DynamicBlock):
    """Coarse view, sampling-location policy, keep gates, patch encoder and similarity aggregation.

    Args:
        encoder: the base network without its classifier, Tensor[P, C, p, p] → Tensor[P, D].
        in_channels: image channels.
        features: D.
        num_classes: number of classes.
        config: the recipe's settings.
    """

    granularity = "glimpse"

    def __init__(
        self, encoder: nn.Module, in_channels: int, features: int, num_classes: int, config: LSTSConfig
    ) -> None:
        super().__init__()
        cw, dc = config.coarse_width, config.coarse_features
        self.grid, self.patch_size, self.max_offset = config.grid, config.patch_size, config.max_offset
        self.coarse = nn.Sequential(
            nn.AvgPool2d(config.coarse_scale), _cbr(in_channels, cw), _cbr(cw, cw, 2), _cbr(cw, dc, 2)
        )
        self.policy = nn.Linear(dc, 2)  # offset of each grid point, from the coarse feature there
        nn.init.zeros_(self.policy.weight)
        nn.init.zeros_(self.policy.bias)
        self.gate = open_bias_(nn.Linear(dc, 1))  # keep the patch at this location
        self.fine = encoder
        self.lift = nn.Linear(dc, features)  # the coarse token, in the fine features' space
        self.query = nn.Linear(features, config.embed)
        self.key = nn.Linear(features, config.embed)
        self.classifier = nn.Linear(features, num_classes)
        self.register_buffer("points", grid_points(config.grid), persistent=False)

    @property
    def num_locations(self) -> int:
        return self.grid**2

    # -- pieces -----------------------------------------------------------------------------------
    def glance(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The cheap pass: image Tensor[N, C, H, W] → (coarse map, offsets and locations Tensor[N, K, 2],
        coarse token Tensor[N, D], its key Tensor[N, E], query Tensor[N, E])."""
        coarse = self.coarse(x)
        n = x.shape[0]
        points = self.points.to(x.dtype).expand(n, -1, -1)
        spacing = 2.0 / self.grid
        offsets = torch.tanh(self.policy(sample_at(coarse, points))) * (self.max_offset * spacing)
        token = self.lift(coarse.mean((2, 3)))
        return coarse, offsets, points + offsets, token, self.key(token), self.query(token)

    def gate_logits(self, coarse: Tensor, locations: Tensor) -> Tensor:
        """Keep logit of every location, Tensor[N, K], from the coarse feature read there."""
        return self.gate(sample_at(coarse, locations)).squeeze(2)

    def encode(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        """The expensive part, per patch: Tensor[P, C, p, p] → (features Tensor[P, D], keys Tensor[P, E])."""
        f = self.fine(patches)
        return f, self.key(f)

    def head(self, values: Tensor, keys: Tensor, query: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """Aggregate Tensor[N, 1 + K, ...] (coarse token first) and classify → (logits, weights)."""
        aggregated, weights = similarity_aggregate(values, keys, query, keep)
        return self.classifier(aggregated), weights

    def _crops(self, x: Tensor, locations: Tensor) -> Tensor:
        """Every location's patch, Tensor[N·K, C, p, p] (sample-major)."""
        k = self.num_locations
        return crop_glimpse(x.repeat_interleave(k, 0), locations.reshape(-1, 2), self.patch_size)

    def _costs(
        self, x: Tensor, coarse: Tensor, locations: Tensor, values: Tensor, keys: Tensor, query: Tensor
    ) -> tuple[int, int, int, int]:
        """Per-sample MACs of the glance, the gates, one patch and the head (probed on meta tensors)."""
        patch = x.new_empty((1, x.shape[1], self.patch_size, self.patch_size))
        keep = values.new_ones(values.shape[:2])
        return (
            self.cost("glance", lambda m, a: m.glance(a), x),
            self.cost("gate", lambda m, a, b: m.gate_logits(a, b), coarse, locations),
            self.cost("patch", lambda m, a: m.encode(a), patch),
            self.cost("head", lambda m, a, b, c, z: m.head(a, b, c, z), values, keys, query, keep),
        )

    # -- modes ----------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor) -> Tensor:
        """Every location's patch, no gate evaluated."""
        n, k = x.shape[0], self.num_locations
        _, _, locations, token, key0, query = self.glance(x)
        f, keys = self.encode(self._crops(x, locations))
        values = torch.cat([token.unsqueeze(1), f.view(n, k, -1)], 1)
        keys = torch.cat([key0.unsqueeze(1), keys.view(n, k, -1)], 1)
        return self.head(values, keys, query, x.new_ones((n, 1 + k)))[0]

    def forward_masked(self, x: Tensor) -> Tensor:
        return self._run(x, sparse=False)

    def forward_sparse(self, x: Tensor) -> Tensor:
        return self._run(x, sparse=True)

    def _run(self, x: Tensor, *, sparse: bool) -> Tensor:
        n, k = x.shape[0], self.num_locations
        coarse, offsets, locations, token, key0, query = self.glance(x)
        keep, prob = gumbel_sigmoid(self.gate_logits(coarse, locations), self.tau, noise=self.training)
        if sparse:
            # Only the kept (sample, location) pairs are cropped and encoded; the rest stay zero (weight 0).
            flat = (keep.detach() > 0.5).flatten().nonzero().squeeze(1)
            f_all = x.new_zeros((n * k, token.shape[1]))
            k_all = x.new_zeros((n * k, key0.shape[1]))
            if flat.numel() > 0:
                crops = crop_glimpse(
                    x.index_select(0, flat // k), locations.reshape(-1, 2).index_select(0, flat), self.patch_size
                )
                f, keys = self.encode(crops)
                f_all, k_all = f_all.index_copy(0, flat, f), k_all.index_copy(0, flat, keys)
        else:
            f_all, k_all = self.encode(self._crops(x, locations))
        values = torch.cat([token.unsqueeze(1), f_all.view(n, k, -1)], 1)
        keys = torch.cat([key0.unsqueeze(1), k_all.view(n, k, -1)], 1)
        logits, weights = self.head(values, keys, query, torch.cat([keep.new_ones((n, 1)), keep], 1))
        t = current_trace()
        if t is not None:
            costs = self._costs(x, coarse, locations, values, keys, query)
            self._record(t, x, costs, keep, prob, offsets, locations, weights, sparse=sparse)
        return logits

    def _record(
        self,
        t: Trace,
        x: Tensor,
        costs: tuple[int, int, int, int],
        keep: Tensor,
        prob: Tensor,
        offsets: Tensor,
        locations: Tensor,
        weights: Tensor,
        *,
        sparse: bool,
    ) -> None:
        n, k = x.shape[0], self.num_locations
        glance, gate, patch, head = costs
        count = keep.sum(1).double()  # straight-through in training: the budget loss reaches the gates
        t.record_decision("lsts/patches", Decision(keep, prob, self.granularity))
        t.record_output("lsts/offsets", offsets)
        t.record_output("lsts/locations", locations)
        t.record_output("lsts/weights", weights)
        t.record_macs("lsts/glance", float(glance), batch_size=n, dense=glance)
        t.record_macs("lsts/gate", float(gate), batch_size=n)
        t.record_macs(
            "lsts/patches",
            count * patch,
            executed=count.detach() * patch if sparse else float(k * patch),
            minimum=0.0,
            maximum=k * patch,
            dense=k * patch,
        )
        t.record_macs("lsts/head", float(head), batch_size=n, dense=head)


class LSTS(DynamicModel):
    """LSTS as a :class:`DynamicModel`; objective: cross-entropy + MAC-budget loss on the kept patches."""

    def budget_knob(self) -> Knob:
        """One offset added to the keep logit of every location."""
        return LogitShift(self.calibration[0], [(self.net.gate.bias, None, 1.0)]).knob(name="keep-gate logit offset")


def _check_patch_fits(encoder: nn.Module, in_channels: int, patch_size: int) -> None:
    """Raise one clear ``ValueError`` when ``encoder`` cannot run on a ``patch_size`` patch (it downsamples it to
    nothing: VGG's five poolings, ConvNeXt's 4x stem and three 2x2 downsamplings take 16 pixels below 1)."""
    was = encoder.training
    try:
        with torch.no_grad():
            encoder.eval()(torch.zeros(1, in_channels, patch_size, patch_size))
    except RuntimeError as err:
        raise ValueError(
            f"lsts needs patches its base network can encode: a {patch_size}x{patch_size}-pixel patch is too small "
            f"for {type(encoder).__name__} ({str(err).splitlines()[0]}); convert with a larger patch_size (32 or 64)"
        ) from err
    finally:
        encoder.train(was)


@recipe(
    "lsts",
    paper="Learning Where to Focus for Efficient Video Object Detection (ECCV 2020), arXiv:1911.05253",
    budget=BudgetPolicy("trained+calibrated", knob="keep-gate logit offset", reachable=(0.05, 1.0),
                        derives="MAC-budget loss target = budget (mean number of the K patches computed)"),
    test_input=(1, 32, 32),
    reproduces_base=False,
)  # fmt: skip
def convert(model: nn.Module, config: LSTSConfig, targets: Targets = "auto") -> LSTS:
    """Use ``model`` minus its last linear layer as the patch encoder; add the coarse view, policy and gates."""
    name, fc = classifier_of(model, needed_by="lsts")
    in_channels = first_conv_in_channels(model) or 1
    replace_module(model, name, nn.Identity())
    _check_patch_fits(model, in_channels, config.patch_size)
    body = LearnableSampling(model, in_channels, fc.in_features, fc.out_features, config)
    return LSTS(body, recipe="lsts", config=copy.copy(config), in_channels=in_channels)
