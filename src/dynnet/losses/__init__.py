"""Training losses for decision policies, as pure functions."""

from dynnet.losses.batch_shaping import batch_shaping_loss, beta_cdf
from dynnet.losses.budget import mac_budget_loss, target_rate_loss
from dynnet.losses.early_exit import (
    adaptive_exit_targets,
    exit_distillation_loss,
    exit_mixture,
    expected_exit_cost,
    multi_exit_cross_entropy,
    weighted_policy_loss,
)
from dynnet.losses.energy import EnergyCosts, energy_budget_loss, layer_energy
from dynnet.losses.instance_sparsity import channel_norms, feature_l21, instance_keep_mask
from dynnet.losses.moe_balance import cv_squared, importance_loss, load_loss

__all__ = [
    "EnergyCosts",
    "adaptive_exit_targets",
    "batch_shaping_loss",
    "beta_cdf",
    "channel_norms",
    "cv_squared",
    "energy_budget_loss",
    "exit_distillation_loss",
    "exit_mixture",
    "expected_exit_cost",
    "feature_l21",
    "importance_loss",
    "instance_keep_mask",
    "layer_energy",
    "load_loss",
    "mac_budget_loss",
    "multi_exit_cross_entropy",
    "target_rate_loss",
    "weighted_policy_loss",
]
