"""Gradient estimators for discrete decisions, as pure functions.

Each returns the straight-through tensor (forward value hard, gradient of the soft relaxation) and the
soft probabilities, so a block can build a :class:`~dynnet.core.Decision` from them.
"""

from dynnet.estimators.gumbel import gumbel_sigmoid, gumbel_softmax, sample_gumbel
from dynnet.estimators.straight_through import straight_through, straight_through_sigmoid

__all__ = ["gumbel_sigmoid", "gumbel_softmax", "sample_gumbel", "straight_through", "straight_through_sigmoid"]
