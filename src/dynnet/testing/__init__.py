"""Helpers for testing recipes: tiny models and gate scrambling for the conformance suite."""

from dynnet.testing.conformance import build_recipe_pair, scramble_gates

__all__ = ["build_recipe_pair", "scramble_gates"]
