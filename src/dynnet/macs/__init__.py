"""MAC counting: an aten-op rule table for what executes, decision-aware rules for dynamic blocks."""

from dynnet.macs.api import MacReport, count_macs
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
