"""Glimpses and crops: look at a few chosen regions of the image instead of all of it.

Importing this package registers the recipes ``dcn``, ``gfnet``, ``lsts``, ``ram`` and ``visual_attention_action``.
Public API for recipes built on RAM (DT-RAM, :mod:`dynnet.methods.early_exit.dt_ram`): :class:`RAMConfig`,
``RAM_SCRATCH`` (its optimiser from scratch), :class:`RecurrentAttention` (the glimpse loop and its extension
points: ``stopping``, ``stop_rule``, ``after_step``, ``run_glimpses``, ``step_costs``, ``stop_costs``,
``classifier_cost``, ``record_step_macs``) and :class:`RAM` (``task_loss``, ``reward``, ``calibrate_to_``).
:mod:`._common` (glimpse extraction, Gaussian policies, REINFORCE losses) is the family's own.
"""

from dynnet.methods.glimpse import dcn, gfnet, lsts, ram, visual_attention_action
from dynnet.methods.glimpse.ram import RAM, RAM_SCRATCH, RAMConfig, RecurrentAttention

__all__ = [
    "RAM", "RAM_SCRATCH", "RAMConfig", "RecurrentAttention", "dcn", "gfnet", "lsts", "ram", "visual_attention_action",
]  # fmt: skip
