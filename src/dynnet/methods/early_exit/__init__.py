"""Early exits: classifiers along the network; each sample stops at the first exit confident enough.

Importing this package registers the recipes ``branchynet``, ``cdl``, ``adaptive_nn``, ``msdnet``, ``imta``,
``dynexit``, ``hierarchical_exits``, ``triple_wins``, ``early_exit_cnn``, ``dt_ram`` and ``network_selection``
(and the base model ``msdnet_tiny``).
Shared machinery: :mod:`._trunk` (trunks, exit placement), :mod:`._cascade` (the exit cascade with batch
compaction), :mod:`._model` (the converted model: objective, thresholds), :mod:`._common` (exit scores, heads, the
budget's exit profile) and :mod:`.calibration` (anytime evaluation, budgeted-batch threshold calibration, which
:func:`dynnet.calibrate` runs for every recipe of the family).
"""

from dynnet.methods.early_exit import (
    adaptive_nn,
    branchynet,
    cdl,
    dt_ram,
    dynexit,
    early_exit_cnn,
    hierarchical_exits,
    imta,
    msdnet,
    network_selection,
    triple_wins,
)
from dynnet.methods.early_exit._cascade import ExitCascade
from dynnet.methods.early_exit._common import budget_exit_weights, geometric_exit_shares
from dynnet.methods.early_exit._model import EarlyExitModel
from dynnet.methods.early_exit._trunk import ExitPlan, Trunk, place_exits, plan_exits, register_trunk, trunk_of
from dynnet.methods.early_exit.calibration import (
    Calibration,
    ExitProfile,
    anytime_curve,
    apply_thresholds,
    budgeted_curve,
    calibrate_,
    calibrate_thresholds,
    collect_exits,
)
from dynnet.methods.early_exit.dt_ram import DTRAMCurriculum

__all__ = [
    "Calibration",
    "DTRAMCurriculum",
    "EarlyExitModel",
    "ExitCascade",
    "ExitPlan",
    "ExitProfile",
    "Trunk",
    "adaptive_nn",
    "anytime_curve",
    "apply_thresholds",
    "branchynet",
    "budget_exit_weights",
    "budgeted_curve",
    "calibrate_",
    "calibrate_thresholds",
    "cdl",
    "collect_exits",
    "dt_ram",
    "dynexit",
    "early_exit_cnn",
    "geometric_exit_shares",
    "hierarchical_exits",
    "imta",
    "msdnet",
    "network_selection",
    "place_exits",
    "plan_exits",
    "register_trunk",
    "triple_wins",
    "trunk_of",
]
