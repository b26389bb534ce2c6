"""MAC counting: an aten-op rule table for what executes, decision-aware rules for dynamic blocks.

:func:`count_macs` and :class:`MacReport` (which trace a model) are imported on first use, so that the kernels can
register their ops' rules (:mod:`dynnet.macs.rules`) without importing the rest of dynnet.
"""

from typing import Any

from dynnet.macs.counter import MacCounter, counting_suspended, suspend_counting
from dynnet.macs.report import format_module_table
from dynnet.macs.rules import MAC_RULES, register_mac_rule

__all__ = [
    "MAC_RULES",
    "MacCounter",
    "MacReport",
    "count_macs",
    "counting_suspended",
    "format_module_table",
    "register_mac_rule",
    "suspend_counting",
]


def __getattr__(name: str) -> Any:
    if name in ("MacReport", "count_macs"):
        from dynnet.macs import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
