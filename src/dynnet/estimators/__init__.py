"""Gradient estimators for discrete decisions, as pure functions.

Each returns the straight-through tensor (forward value hard, gradient of the soft relaxation) and the
soft probabilities, so a block can build a :class:`~dynnet.core.Decision` from them; REINFORCE and ponder
helpers cover the policy-gradient and halting methods.
"""

from dynnet.estimators.gumbel import gumbel_sigmoid, gumbel_softmax, sample_gumbel
from dynnet.estimators.ponder import ActWeights, act_weights, halts, ponder_cost, straight_through_select
from dynnet.estimators.reinforce import (
    bernoulli_entropy,
    bernoulli_log_prob,
    moving_average,
    reinforce_loss,
    sample_bernoulli,
    self_critical_advantage,
)
from dynnet.estimators.straight_through import straight_through, straight_through_sigmoid

__all__ = [
    "ActWeights",
    "act_weights",
    "bernoulli_entropy",
    "bernoulli_log_prob",
    "gumbel_sigmoid",
    "gumbel_softmax",
    "halts",
    "moving_average",
    "ponder_cost",
    "reinforce_loss",
    "sample_bernoulli",
    "sample_gumbel",
    "self_critical_advantage",
    "straight_through",
    "straight_through_select",
    "straight_through_sigmoid",
]
