"""Building blocks shared by the recipe families, between :mod:`dynnet.core` and :mod:`dynnet.methods`.

- :class:`DecisionMaker`: a decision-making module that lives outside the blocks it decides for (SkipNet's shared
  recurrent gate, BlockDrop's policy network, RNP's agent, GaterNet's gater, an exit classifier).
- :class:`AdaptedResidual`: the base of dynamic blocks wrapping an existing residual block through its adapter
  (children adopted under their own names; body, shortcut, post).
- :class:`SpatialResidual`: a residual block whose branch runs only at a spatial mask's positions (spatial and block
  families), with the registry of how block classes split into conv stages (:func:`register_spatial_chain`).
"""

from dynnet.blocks.decision import DecisionMaker, LogitEntry
from dynnet.blocks.residual import AdaptedResidual
from dynnet.blocks.spatial import (
    SpatialResidual,
    calibrate_dense_fallback_,
    no_spatial_chain,
    register_spatial_chain,
    spatial_chain,
)  # fmt: skip

__all__ = [
    "AdaptedResidual", "DecisionMaker", "LogitEntry", "SpatialResidual", "calibrate_dense_fallback_",
    "no_spatial_chain", "register_spatial_chain", "spatial_chain",
]  # fmt: skip
