"""Spatial family: pixel-wise decisions of where to compute (recipes register on import)."""

from dynnet.methods.spatial import (
    dynconv,
    perforated_cnn,
    pixel_attentional_gating,
    precision_gating,
    sact,
    stochastic_sampling_interp,
)
from dynnet.methods.spatial.gates import PixelGateUnit, SqueezeMaskUnit

__all__ = [
    "PixelGateUnit",
    "SqueezeMaskUnit",
    "dynconv",
    "perforated_cnn",
    "pixel_attentional_gating",
    "precision_gating",
    "sact",
    "stochastic_sampling_interp",
]
