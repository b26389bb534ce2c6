"""DCN — Almahairi, Ballas, Cooijmans, Zheng, Larochelle, Courville, "Dynamic Capacity Networks", ICML 2016.
https://arxiv.org/abs/1511.07838

A cheap coarse network ``f_c`` runs on the whole (down-sampled) image and a high-capacity fine network ``f_f``
runs only on the input patches that matter; both produce feature maps on the same grid (one cell per
``patch_size`` × ``patch_size`` input patch), and the top layers ``g`` classify the hybrid map in which the fine
features replace the coarse ones at the chosen cells. A cell's saliency is the norm of the gradient of the
entropy of the coarse prediction ``g(f_c(x))`` with respect to the coarse features at that cell (the paper's
attention). Training adds the paper's hint loss ``||f_c - f_f||^2`` at the chosen cells, so that the coarse
features learn to predict the fine ones, and the coarse prediction's cross-entropy. In sparse mode the chosen
patches are cut out of the image (0 MACs) and only they go through ``f_f``; ``f_f`` is patch-local (its
convolutions have stride = kernel), so a patch's fine features do not depend on its neighbours and the sparse
result equals the masked one without halos. Images whose sides are not multiples of the patch size (8 pixels) are
zero-padded at the bottom and right.

Departures from the paper:

* at inference the number of fine patches is per sample: a cell is chosen when its saliency reaches
  ``saliency_threshold`` times the image's mean saliency (optionally capped at ``max_patches``); the paper takes a
  fixed top-k, which training keeps (below). The threshold is a buffer, calibrated for the budget;
* the fine network is patch-local (non-overlapping receptive fields) instead of the paper's overlapping
  convolutions with their halo, which lets sparse mode run exactly the chosen patches;
* the saliency's backward pass through ``g`` is not counted in MACs (MACs count forward ops only, see
  ``docs/macs.md``); it costs about twice ``g``'s forward MACs and does run in both modes;
* the default widths make the coarse network and the top layers cheap next to the fine network everywhere (the
  paper's premise: the coarse network and the top layers together cost about a quarter of the fine model), so
  that refining fewer cells saves MACs;
* ``reproduces_base=False``: DCN is its own architecture; dense mode is the fine network everywhere (the
  paper's "fine model" baseline); the converted base network only gives input channels and classes.

Budget: calibrated. ``budget`` is the target mean fraction of the dense MACs per image (the fine network on every
cell and the top layers: the paper's fine model). It sets the paper's ``k``, the number of cells refined per
image, at the number whose MACs (coarse network, saliency pass, ``k`` fine patches, top layers) are the budget; in
training the ``k`` most salient cells of every image are refined (the paper's top-k, at least one). At inference
the cells are chosen by the saliency threshold, which :func:`dynnet.calibrate` sets on held-out images until the
mean MAC fraction equals the budget (the same mean cost, spread over images by their saliency). Reachable: from the
coarse network and the top layers alone (about 0.23 of the dense MACs at the default widths) to 1 (refining every
cell costs the fine model plus the coarse pass, about 1.17).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.convert import Targets, first_conv_in_channels, num_classes_of
from dynnet.core import Decision, DynamicBlock, DynamicModel, LossOutput, Trace, current_trace
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.testing.scramble import register_randomiser

__all__ = ["DCN", "DCNConfig", "DynamicCapacity", "convert", "entropy_saliency", "select_cells", "top_cells"]


@dataclass(frozen=True)
class DCNConfig:
    """Settings of DCN.

    Attributes:
        budget: target mean fraction of the dense MACs per image: it sets ``k``, the cells refined per image in
            training (the paper's top-k), and calibration sets the saliency threshold to it.
        features: D, channels of the coarse and fine feature maps.
        coarse_width: channels inside the coarse network.
        fine_width: channels inside the fine network.
        saliency_threshold: at inference a cell is chosen when its saliency is at least this multiple of the mean
            (until calibrated).
        max_patches: optional cap on chosen cells per image, in training and at inference; ``None``: no cap.
        hint_weight: weight of the hint loss.
        coarse_weight: weight of the coarse prediction's cross-entropy.
    """

    budget: float = 0.5
    features: int = 32
    coarse_width: int = 16
    fine_width: int = 128
    saliency_threshold: float = 1.0
    max_patches: int | None = None
    hint_weight: float = 1.0
    coarse_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if min(self.features, self.coarse_width, self.fine_width) < 1:
            raise ValueError(
                f"features and widths must be >= 1, got {self.features}, {self.coarse_width}, {self.fine_width}"
            )
        if self.max_patches is not None and self.max_patches < 1:
            raise ValueError(f"max_patches must be >= 1 or None, got {self.max_patches}")


PATCH = 8  # input pixels per feature cell (two stride-2 layers after a 2× down-sampling, or 4 × 2 strides)


def _cbr(c_in: int, c_out: int, k: int = 3, stride: int = 1, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, padding, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


def entropy_saliency(top: nn.Module, coarse: Tensor) -> tuple[Tensor, Tensor]:
    """DCN's attention: ``|| d H(softmax(top(coarse))) / d coarse[:, :, i, j] ||_2`` for every cell.

    Args:
        top: the top layers, Tensor[N, D, G, G'] → logits Tensor[N, K].
        coarse: Tensor[N, D, G, G'] coarse features (kept in the graph when they require grad).

    Returns:
        ``(saliency, logits)``: Tensor[N, G·G'] and the coarse prediction Tensor[N, K].
    """
    # The gradient is needed at inference too: leave inference mode / no_grad for this small backward pass.
    with torch.inference_mode(False), torch.enable_grad():
        src = coarse if coarse.requires_grad else coarse.clone().requires_grad_()
        logits = top(src)
        logp = F.log_softmax(logits, 1)
        entropy = -(logp.exp() * logp).sum()
        (grad,) = torch.autograd.grad(entropy, src, retain_graph=src is coarse)
    return grad.detach().norm(dim=1).flatten(1), (logits if src is coarse else logits.detach())


def top_cells(saliency: Tensor, k: int) -> Tensor:
    """The ``k`` most salient cells of every image (the paper's top-k): Tensor[N, P] bool."""
    chosen = torch.zeros(saliency.shape, dtype=torch.bool, device=saliency.device)
    return chosen.scatter_(1, saliency.topk(min(k, saliency.shape[1]), 1).indices, True)


def select_cells(saliency: Tensor, threshold: Tensor | float, max_cells: int | None) -> Tensor:
    """Cells with saliency ``>= threshold * mean``, at most ``max_cells`` (the most salient): Tensor[N, P] bool."""
    chosen = saliency >= threshold * saliency.mean(1, keepdim=True)
    if max_cells is not None and max_cells < saliency.shape[1]:
        rank = saliency.argsort(1, descending=True).argsort(1)
        chosen &= rank < max_cells
    return chosen


class DynamicCapacity(DynamicBlock):
    """Coarse network, patch-local fine network, top layers and the saliency-based choice of cells.

    Args:
        in_channels: image channels.
        num_classes: K.
        config: the recipe's settings.
    """

    granularity = "spatial"

    def __init__(self, in_channels: int, num_classes: int, config: DCNConfig) -> None:
        super().__init__()
        d, cw, fw = config.features, config.coarse_width, config.fine_width
        self.coarse = nn.Sequential(
            nn.AvgPool2d(2), _cbr(in_channels, cw), _cbr(cw, cw, stride=2), _cbr(cw, d, stride=2)
        )
        self.fine = nn.Sequential(
            _cbr(in_channels, fw, 4, 4, 0), _cbr(fw, fw, 1, 1, 0), _cbr(fw, fw, 2, 2, 0), _cbr(fw, d, 1, 1, 0)
        )
        self.top = nn.Sequential(_cbr(d, d), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(d, num_classes))
        self.max_patches, self.hint_weight, self.budget = config.max_patches, config.hint_weight, config.budget
        self.register_buffer("saliency_threshold", torch.tensor(float(config.saliency_threshold)))

    @staticmethod
    def pad(x: Tensor) -> Tensor:
        """Zero-pad the bottom and right of Tensor[N, C, H, W] to sides divisible by the patch size (0 MACs)."""
        h, w = x.shape[-2:]
        ph, pw = -h % PATCH, -w % PATCH
        return F.pad(x, (0, pw, 0, ph)) if ph or pw else x

    def _costs(self, x: Tensor, coarse: Tensor) -> tuple[int, int, int, int]:
        c = self.cost("coarse", lambda m, a: m.coarse(a), x)
        top = self.cost("top", lambda m, a: m.top(a), coarse)
        patch = x.new_empty((1, x.shape[1], PATCH, PATCH))
        fine = self.cost("fine_patch", lambda m, a: m.fine(a), patch)
        return c, top, fine, coarse.shape[-1] * coarse.shape[-2]

    def patches_for_budget(self, x: Tensor, coarse: Tensor) -> int:
        """``k``: the cells refined per image whose MACs (coarse network, saliency pass, ``k`` fine patches, top
        layers) are nearest ``budget`` times the dense MACs (the fine network on every cell and the top layers);
        at least 1, at most ``max_patches``."""
        c, top, fine, cells = self._costs(x, coarse)
        k = round((self.budget * (cells * fine + top) - c - 2 * top) / fine)
        return max(1, min(k, cells, self.max_patches or cells))

    def choose(self, x: Tensor, coarse: Tensor, saliency: Tensor) -> Tensor:
        """Tensor[N, P] bool cells to refine: the top ``k`` in training, the saliency threshold at inference."""
        if self.training:
            return top_cells(saliency, self.patches_for_budget(x, coarse))
        return select_cells(saliency, self.saliency_threshold, self.max_patches)

    # -- modes ----------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor) -> Tensor:
        x = self.pad(x)
        return self.top(self.fine(x))

    def forward_masked(self, x: Tensor) -> Tensor:
        x = self.pad(x)
        coarse = self.coarse(x)
        saliency, coarse_logits = entropy_saliency(self.top, coarse)
        chosen = self.choose(x, coarse, saliency)
        fine = self.fine(x)
        m = chosen.view(coarse.shape[0], 1, *coarse.shape[-2:]).to(x.dtype)
        hybrid = coarse * (1 - m) + fine * m
        self._record(x, coarse, chosen, coarse_logits, sparse=False)
        t = current_trace()
        if t is not None and self.training:
            hint = (((coarse - fine.detach()) ** 2) * m).sum() / m.sum().clamp(min=1) / coarse.shape[1]
            t.add_loss("dcn/hint", self.hint_weight * hint)
        return self.top(hybrid)

    def forward_sparse(self, x: Tensor) -> Tensor:
        x = self.pad(x)
        coarse = self.coarse(x)
        saliency, coarse_logits = entropy_saliency(self.top, coarse)
        chosen = select_cells(saliency, self.saliency_threshold, self.max_patches)
        n, d, gh, gw = coarse.shape
        flat = chosen.flatten().nonzero().squeeze(1)  # (sample, cell) pairs, cell-major within a sample
        hybrid = coarse
        if flat.numel() > 0:
            c = x.shape[1]
            patches = x.view(n, c, gh, PATCH, gw, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(n * gh * gw, c, PATCH, PATCH)
            fine = self.fine(patches.index_select(0, flat)).flatten(1)  # Tensor[P, D]
            cells = coarse.permute(0, 2, 3, 1).reshape(n * gh * gw, d).index_copy(0, flat, fine)
            hybrid = cells.view(n, gh, gw, d).permute(0, 3, 1, 2)
        self._record(x, coarse, chosen, coarse_logits, sparse=True)
        return self.top(hybrid)

    def _record(self, x: Tensor, coarse: Tensor, chosen: Tensor, coarse_logits: Tensor, *, sparse: bool) -> None:
        t = current_trace()
        if t is None:
            return
        n = x.shape[0]
        c, top, fine, cells = self._costs(x, coarse)
        count = chosen.sum(1).double()
        t.record_decision("dcn/cells", Decision(chosen.to(x.dtype), None, "spatial"))
        t.record_output("dcn/coarse_logits", coarse_logits)
        t.record_macs("dcn/coarse", float(c), batch_size=n)
        t.record_macs("dcn/saliency_top", float(top), batch_size=n)
        t.record_macs(
            "dcn/fine",
            count * fine,
            executed=count * fine if sparse else float(cells * fine),
            minimum=0.0,
            maximum=cells * fine,
            dense=cells * fine,
        )
        t.record_macs("dcn/top", float(top), batch_size=n, dense=top)


class DCN(DynamicModel):
    """DCN as a :class:`DynamicModel`; objective: cross-entropy of the hybrid and coarse predictions + hint loss."""

    def budget_knob(self) -> Knob:
        """The saliency threshold (a multiple of each image's mean saliency): the larger, the fewer cells refined."""
        threshold = self.net.saliency_threshold

        def set_threshold(v: float) -> None:
            with torch.no_grad():
                threshold.fill_(v)

        return Knob("saliency threshold", lambda: float(threshold), set_threshold, 0.0, 1e3, increasing=False)

    def compute_loss(self, logits: Tensor, target: Tensor, t: Trace, budget: float | None = None) -> LossOutput:
        task = F.cross_entropy(logits, target)
        total, parts = task, {"task": float(task.detach())}
        if "dcn/coarse_logits" in t.outputs:
            coarse = self.config.coarse_weight * F.cross_entropy(t.outputs["dcn/coarse_logits"], target)
            total = total + coarse
            parts["coarse"] = float(coarse.detach())
        if t.losses:
            aux = t.aux_loss()
            total = total + aux
            parts["hint"] = float(aux.detach())
        return LossOutput(total, parts)


@recipe(
    "dcn",
    paper="Dynamic Capacity Networks (ICML 2016), arXiv:1511.07838",
    budget=BudgetPolicy("calibrated", knob="saliency threshold", reachable=(0.3, 1.0),
                        derives="k, the cells refined per image in training (the paper's top-k)"),
    test_input=(1, 32, 32),
    reproduces_base=False,
)  # fmt: skip
def convert(model: nn.Module, config: DCNConfig, targets: Targets = "auto") -> DCN:
    """Build a DCN with ``model``'s input channels and classes (the base network is not reused)."""
    in_channels = first_conv_in_channels(model) or 1
    body = DynamicCapacity(in_channels, num_classes_of(model), config)
    return DCN(body, recipe="dcn", config=copy.copy(config), in_channels=in_channels)


@register_randomiser(DCN)
def _randomise(model: DCN, generator: torch.Generator) -> int:
    """A random saliency threshold (testing), so that images get different numbers of fine patches."""
    with torch.no_grad():
        model.net.saliency_threshold.fill_(0.6 + 0.8 * float(torch.rand((), generator=generator)))
    return 1
