"""SBNet — Ren, Pokrovsky, Yang & Urtasun, "SBNet: Sparse Blocks Network for Fast Inference", CVPR 2018.
https://openaccess.thecvf.com/content_cvpr_2018/html/Ren_SBNet_Sparse_Blocks_CVPR_2018_paper.html
(arXiv:1801.02108, code: github.com/uber-research/sbnet).

Block-sparse execution of residual blocks: a mask is reduced to active output tiles; each active tile is
gathered from the block input *with the halo* of the whole residual branch, the tiles are stacked into a
batch, the branch runs densely on it with ``padding=0``, and the output tiles are added back onto the
shortcut (SBNet's reduce-mask → sparse-gather → dense conv → sparse-scatter, with the ResNet-block fusion
of §4 of the paper). The output at active tiles equals the dense block exactly, so the masked-mode
reference is ``post(shortcut(x) + M_tile ⊙ branch(x))``.

The engine (:func:`dynnet.kernels.chain.run_tiles`, :mod:`dynnet.kernels.block`) is a backend any
recipe can use (``SpatialResidual(..., execution="tile")``).

Departures from the paper:
* SBNet takes its mask from outside (a road map or a separate segmentation network). Here each block has
  a small learned mask unit (3×3 conv to one channel at the block's output stride, averaged per tile,
  Gumbel-Sigmoid with straight-through, trained with the MAC-budget loss), so the recipe is a complete
  dynamic network; pass decisions to ``forward`` to use an external mask;
* tiles are square and non-overlapping on the block's output grid (the paper also allows overlapping
  output blocks); pure-PyTorch gather (strided ``unfold`` view + advanced indexing) instead of CUDA kernels;
* theoretical MACs count the pixels of the active tiles and their receptive masks; executed MACs add the
  tile halos (including halo positions outside the image), so ``executed ≥ theoretical`` by design.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynnet.blocks import SpatialResidual, no_spatial_chain, spatial_chain
from dynnet.convert import Targets, first_conv_in_channels, replace_module, residual_blocks
from dynnet.core import Decision, DynamicModel
from dynnet.core.budget import BudgetPolicy, Knob
from dynnet.core.recipe import recipe
from dynnet.estimators import gumbel_sigmoid
from dynnet.gates.pooled import OPEN_LOGIT

__all__ = ["SBNet", "SBNetBlock", "SBNetConfig", "TileMaskUnit"]


@dataclass(frozen=True)
class SBNetConfig:
    """Settings of SBNet.

    Attributes:
        budget: target mean fraction of the dense MACs per image (theoretical: active tiles, mask units included);
            the target of the MAC-budget loss.
        tile: side of the output tiles (the paper's block size); larger tiles waste less on halos.
        tau: Gumbel-Sigmoid temperature of the mask units.
        budget_weight: weight of the MAC-budget loss.
    """

    budget: float = 0.5
    tile: int = 8
    tau: float = 1.0
    budget_weight: float = 5.0


class TileMaskUnit(nn.Module):
    """Tensor[N, C, H, W] → tile logits Tensor[N, ceil(H'/tile), ceil(W'/tile)]: 3×3 conv (stride of the block)
    to one channel, averaged over each tile (partial border tiles average their in-image pixels)."""

    def __init__(self, in_channels: int, stride: int, tile: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, 3, stride, 1, bias=True)
        self.tile = tile
        with torch.no_grad():
            self.conv.weight.zero_()  # only the bias speaks, whatever the scale of the features
            self.conv.bias.fill_(OPEN_LOGIT)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(x), self.tile, ceil_mode=True).squeeze(1)


class SBNetBlock(SpatialResidual):
    """A residual block executed on active tiles; decisions are Tensor[N, n_tiles_y, n_tiles_x]."""

    granularity = "block"

    def decide(self, x: Tensor) -> Decision:
        hard, prob = gumbel_sigmoid(self.gate(x), self.tau, noise=self.training)
        return Decision(hard=hard, soft=prob, granularity="block")


class SBNet(DynamicModel):
    """The converted network; its objective is cross-entropy + ``budget_weight`` × the MAC-budget loss."""

    def budget_knob(self) -> Knob:
        """One offset added to the tile logit of every mask unit (the bias of its 3×3 convolution)."""
        return self.logit_shift_knob([(b.gate.conv.bias, None, 1.0) for _, b in self.blocks()])


@recipe(
    "sbnet",
    paper="SBNet: Sparse Blocks Network for Fast Inference (CVPR 2018), arXiv:1801.02108",
    budget=BudgetPolicy("trained+calibrated", knob="mask logit offset", reachable=(0.1, 1.0),
                        derives="target of the MAC-budget loss = budget (SBNet takes its masks from outside)"),
    exact_executed=False,
)  # fmt: skip
def convert(model: nn.Module, config: SBNetConfig, targets: Targets = "auto") -> SBNet:
    """Make every target residual block of ``model`` block-sparse (in place)."""
    if config.tile < 1:
        raise ValueError(f"tile must be >= 1, got {config.tile}")
    blocks = residual_blocks(model, targets)
    # Tiles run every stage as a convolution: grouped and depthwise stages (ResNeXt, inverted residuals) too.
    found = [(n, b, a, st) for n, b, a in blocks if (st := spatial_chain(b, grouped=True)) is not None]
    if not found:
        raise no_spatial_chain(model, [b for _, b, _ in blocks], "sbnet", grouped=True)
    for name, block, adapter, stages in found:
        stride = 1
        for st in stages:
            stride *= st.geometry[1]
        gate = TileMaskUnit(adapter.in_channels(block), stride, config.tile)
        new = SBNetBlock(block, adapter, stages, gate, execution="tile", tile=config.tile)
        new.block_name, new.tau = name, config.tau
        replace_module(model, name, new)
    return SBNet(model, recipe="sbnet", config=copy.copy(config), in_channels=first_conv_in_channels(model))
