"""Training losses for decision policies."""

from dynnet.losses.budget import mac_budget_loss, target_rate_loss

__all__ = ["mac_budget_loss", "target_rate_loss"]
