"""Layer skipping: a decision per residual block and input says whether the block runs."""

from dynnet.methods.layer_skip import convnet_aig
from dynnet.methods.layer_skip.gated_residual import GatedResidual

__all__ = ["GatedResidual", "convnet_aig"]
