"""Gradient estimators for discrete decisions, as pure functions.

Each returns the straight-through tensor (forward value hard, gradient of the soft relaxation) and the
soft probabilities, so a block can build a :class:`~dynnet.core.Decision` from them; REINFORCE and ponder
helpers cover the policy-gradient and halting methods.
"""

from dynnet.estimators.gumbel import gumbel_sigmoid, gumbel_softmax, sample_gumbel
from dynnet.estimators.ponder import ActWeights, act_weights, halts, ponder_cost, straight_through_select
from dynnet.estimators.q_learning import epsilon_greedy, q_learning_loss, td_targets
from dynnet.estimators.reinforce import (
    bernoulli_entropy,
    bernoulli_log_prob,
    moving_average,
    reinforce_loss,
    sample_bernoulli,
    self_critical_advantage,
)
from dynnet.estimators.semhash import improved_semhash, saturating_sigmoid
from dynnet.estimators.stochastic_neurons import noisy_rectifier, st_binary, stochastic_times_smooth, unbiased_binary
from dynnet.estimators.straight_through import straight_through, straight_through_sigmoid

__all__ = [
    "ActWeights",
    "act_weights",
    "bernoulli_entropy",
    "bernoulli_log_prob",
    "epsilon_greedy",
    "gumbel_sigmoid",
    "gumbel_softmax",
    "halts",
    "improved_semhash",
    "moving_average",
    "noisy_rectifier",
    "ponder_cost",
    "q_learning_loss",
    "reinforce_loss",
    "sample_bernoulli",
    "sample_gumbel",
    "saturating_sigmoid",
    "self_critical_advantage",
    "st_binary",
    "stochastic_times_smooth",
    "straight_through",
    "straight_through_select",
    "straight_through_sigmoid",
    "td_targets",
    "unbiased_binary",
]
