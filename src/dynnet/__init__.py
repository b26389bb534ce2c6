"""dynnet: dynamic networks and conditional computation for computer vision.

Convert an existing network with any method of the reading list (``recipe``), train its decision
policy under a compute budget, count per-sample MACs, and run inference that really skips the work.

The names below are imported on first use (PEP 562): ``import dynnet`` itself loads neither torch nor the
recipes, so the ``dynnet`` command answers ``--help`` at once.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# First: filters third-party log lines that are not the user's business before anything imports torch's modules.
from dynnet import _quiet  # noqa: F401

if TYPE_CHECKING:
    from dynnet.api import convert, create_model, list_models, list_recipes
    from dynnet.bench.latency_model import profile_latency
    from dynnet.calibration import CalibrationReport, calibrate
    from dynnet.core import Decision, DynamicBlock, DynamicModel, LatencyModel, Trace, set_mode, set_tau, sparse, trace
    from dynnet.macs import MacReport, count_macs

__version__ = "0.1.0"

_PUBLIC = {
    "convert": "dynnet.api",
    "create_model": "dynnet.api",
    "list_models": "dynnet.api",
    "list_recipes": "dynnet.api",
    "CalibrationReport": "dynnet.calibration",
    "calibrate": "dynnet.calibration",
    "Decision": "dynnet.core",
    "DynamicBlock": "dynnet.core",
    "DynamicModel": "dynnet.core",
    "LatencyModel": "dynnet.core",
    "profile_latency": "dynnet.bench.latency_model",
    "Trace": "dynnet.core",
    "set_mode": "dynnet.core",
    "set_tau": "dynnet.core",
    "sparse": "dynnet.core",
    "trace": "dynnet.core",
    "MacReport": "dynnet.macs",
    "count_macs": "dynnet.macs",
}

__all__ = [
    "CalibrationReport",
    "Decision",
    "DynamicBlock",
    "DynamicModel",
    "LatencyModel",
    "MacReport",
    "Trace",
    "__version__",
    "calibrate",
    "convert",
    "count_macs",
    "create_model",
    "list_models",
    "list_recipes",
    "profile_latency",
    "set_mode",
    "set_tau",
    "sparse",
    "trace",
]


def __getattr__(name: str) -> Any:
    """``dynnet.<public name>`` (imported from its module on first use) or ``dynnet.<subpackage>``."""
    module = _PUBLIC.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # next time a plain attribute
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """``dynnet`` itself. Importing a subpackage sets it as an attribute of its parent, and ``dynnet.convert`` (the
    surgery package) would then hide ``dynnet.convert`` (the function), which an eager ``from dynnet.api import
    convert`` used to put back: public names keep their function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return  # the subpackage stays reachable as sys.modules["dynnet.convert"] and by `from ... import`
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
