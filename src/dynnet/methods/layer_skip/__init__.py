"""Layer skipping: a decision per residual block and input says whether the block runs."""

from dynnet.methods.layer_skip import (
    blockdrop,
    convnet_aig,
    dual_dynamic_inference,
    dynamic_multipath,
    energynet,
    skipnet,
)
from dynnet.methods.layer_skip.gated_residual import GatedResidual

__all__ = [
    "GatedResidual",
    "blockdrop",
    "convnet_aig",
    "dual_dynamic_inference",
    "dynamic_multipath",
    "energynet",
    "skipnet",
]
