"""Helpers for testing recipes: tiny models and gate scrambling for the conformance suite."""

from dynnet.testing.conformance import (
    assert_decisions_mixed,
    build_recipe_pair,
    decisions_mixed,
    diverse_inputs,
    scramble_gates,
    scramble_until_mixed,
)
from dynnet.testing.masks import make_mask

__all__ = [
    "assert_decisions_mixed",
    "build_recipe_pair",
    "decisions_mixed",
    "diverse_inputs",
    "make_mask",
    "scramble_gates",
    "scramble_until_mixed",
]
