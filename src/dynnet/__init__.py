"""dynnet: dynamic networks and conditional computation for computer vision.

Convert an existing network with any method of the reading list (``recipe``), train its decision
policy under a compute budget, count per-sample MACs, and run inference that really skips the work.
"""

from dynnet.api import convert, create_model, list_models, list_recipes
from dynnet.calibration import CalibrationReport, calibrate
from dynnet.core import Decision, DynamicBlock, DynamicModel, Trace, set_mode, set_tau, sparse, trace
from dynnet.macs import MacReport, count_macs

__version__ = "0.1.0"

__all__ = [
    "CalibrationReport",
    "Decision",
    "DynamicBlock",
    "DynamicModel",
    "MacReport",
    "Trace",
    "__version__",
    "calibrate",
    "convert",
    "count_macs",
    "create_model",
    "list_models",
    "list_recipes",
    "set_mode",
    "set_tau",
    "sparse",
    "trace",
]
