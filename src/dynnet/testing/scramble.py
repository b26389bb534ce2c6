"""Randomisers: how to put a model's decisions in a random, mixed state, for tests and the conformance suite.

Most recipes keep their decisions in modules named like a gate (``DECISION_MODULE_NAMES``): redrawing those
parameters mixes them (:func:`dynnet.testing.scramble_gates`'s default). A recipe whose decisions live elsewhere (a
threshold buffer, a k-WTA density, an exit threshold, a little network's classifier) registers a randomiser for its
model class next to the recipe, so that test-only code stays off the production class::

    @register_randomiser(FBS)
    def _randomise(model: FBS, generator: torch.Generator) -> int: ...

Lookup is by the model's class MRO (a subclass inherits its parent's randomiser unless it registers its own).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from dynnet.core.registry import TypeRegistry

__all__ = ["RANDOMISERS", "randomise", "randomiser_for", "register_randomiser"]

Randomiser = Callable[[Any, torch.Generator], int]
"""``(model, generator) -> number of tensors changed``."""

RANDOMISERS: TypeRegistry[Randomiser] = TypeRegistry("randomiser")

F = TypeVar("F", bound=Randomiser)


def register_randomiser(cls: type) -> Callable[[F], F]:
    """Decorator: register ``fn(model, generator) -> int`` as the randomiser of ``cls`` (and its subclasses).

    Raises:
        ValueError: ``cls`` already has one.
    """

    def deco(fn: F) -> F:
        RANDOMISERS.register(cls, fn)
        return fn

    return deco


def randomiser_for(model: nn.Module) -> Randomiser | None:
    """The randomiser registered for the nearest class in ``type(model).__mro__``, or ``None``."""
    return RANDOMISERS.lookup(model)


def randomise(model: nn.Module, generator: torch.Generator) -> int | None:
    """Run ``model``'s randomiser (registered, or a user model's own ``scramble_(generator)`` method); ``None`` when
    it has neither (the caller falls back to redrawing the decision modules' parameters)."""
    fn = randomiser_for(model)
    if fn is not None:
        return fn(model, generator)
    own = getattr(model, "scramble_", None)
    return own(generator) if callable(own) else None
