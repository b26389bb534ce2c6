"""Helpers for testing recipes: tiny models, gate scrambling and randomisers for the conformance suite.

Names are imported on first use (PEP 562), so that a recipe module can register its randomiser
(:mod:`dynnet.testing.scramble`) without loading the conformance helpers.
"""

import importlib
from typing import Any

_NAMES = {
    "assert_decisions_mixed": "dynnet.testing.conformance",
    "build_recipe_pair": "dynnet.testing.conformance",
    "decisions_mixed": "dynnet.testing.conformance",
    "diverse_inputs": "dynnet.testing.conformance",
    "scramble_gates": "dynnet.testing.conformance",
    "scramble_until_mixed": "dynnet.testing.conformance",
    "make_mask": "dynnet.testing.masks",
    "randomise": "dynnet.testing.scramble",
    "register_randomiser": "dynnet.testing.scramble",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
