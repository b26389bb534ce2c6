"""Helpers for testing recipes: tiny models and gate scrambling for the conformance suite."""

from dynnet.testing.conformance import build_recipe_pair, diverse_inputs, scramble_gates, scramble_until_mixed

__all__ = ["build_recipe_pair", "diverse_inputs", "scramble_gates", "scramble_until_mixed"]
