"""Kernels that really skip work (the sparse mode's engine). Pure-torch references define correctness.

Pure tensor functions: this floor imports torch, the native extension and the MAC rules only, never a
model, a block or a recipe.

* batch compaction: :func:`compact_add`, :func:`compact_apply` (layer skipping, early exits);
* spatial: pixel gather → GEMM → scatter convolution (:func:`sparse_conv2d`) and tiles with halos (SBNet); a
  residual branch's conv chain run under a mask (:mod:`dynnet.kernels.chain`);
* channels: weight slicing (see :mod:`dynnet.kernels.channel`);
* experts: sort → per-expert run → scatter-add (see :mod:`dynnet.kernels.moe`).
"""

from dynnet.kernels.block import gather_tiles, reduce_to_tiles, scatter_tiles, tile_geometry, tiles_to_pixels
from dynnet.kernels.chain import ConvStage, run_masked, run_pixels, run_tiles, stage_masks
from dynnet.kernels.channel import ConvSpec, fold_bn, gated_rest_conv, sliced_conv_in, sliced_pair
from dynnet.kernels.compaction import compact_add, compact_apply
from dynnet.kernels.spatial import (
    calibrate_crossover,
    gather_conv2d,
    gather_conv_rows,
    masked_conv2d_reference,
    receptive_mask,
    scatter_add_rows,
    sparse_conv2d,
)

__all__ = [
    "ConvSpec",
    "ConvStage",
    "calibrate_crossover",
    "compact_add",
    "compact_apply",
    "fold_bn",
    "gated_rest_conv",
    "gather_conv2d",
    "gather_conv_rows",
    "gather_tiles",
    "masked_conv2d_reference",
    "receptive_mask",
    "reduce_to_tiles",
    "run_masked",
    "run_pixels",
    "run_tiles",
    "scatter_add_rows",
    "scatter_tiles",
    "sliced_conv_in",
    "sliced_pair",
    "sparse_conv2d",
    "stage_masks",
    "tile_geometry",
    "tiles_to_pixels",
]
