"""Randomisers live in a registry by model class (MRO), not as test-only methods on production classes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynnet
from dynnet.core import DynamicModel
from dynnet.testing import scramble_gates
from dynnet.testing.scramble import RANDOMISERS, randomise, randomiser_for, register_randomiser


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_subclasses(sub)}
    return out


def test_no_production_model_class_carries_a_scramble_method() -> None:
    dynnet.list_recipes()  # imports every recipe module
    classes = _subclasses(DynamicModel)
    assert len(classes) > 20  # precondition: the recipes' model classes are loaded
    assert [c.__qualname__ for c in classes if "scramble_" in vars(c)] == []
    assert len(RANDOMISERS.names()) >= 10  # the recipes whose decisions live outside gate modules registered theirs


def test_lookup_follows_the_mro_and_a_subclass_may_register_its_own() -> None:
    from dynnet.methods.early_exit._model import EarlyExitModel
    from dynnet.methods.early_exit.dt_ram import DTRAM
    from dynnet.methods.early_exit.network_selection import NetworkSelectionModel
    from dynnet.methods.glimpse.ram import RAM

    def of(cls: type):
        return randomiser_for(object.__new__(cls))

    assert RAM in RANDOMISERS and DTRAM not in RANDOMISERS
    assert of(DTRAM) is of(RAM) is not None  # inherited
    assert NetworkSelectionModel in RANDOMISERS and of(NetworkSelectionModel) is not of(EarlyExitModel)


def test_registering_a_class_twice_is_refused() -> None:
    class Fresh(nn.Module):
        pass

    register_randomiser(Fresh)(lambda model, g: 0)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_randomiser(Fresh)(lambda model, g: 1)
    finally:
        RANDOMISERS.unregister(Fresh)


def test_a_user_model_with_its_own_scramble_method_is_honoured_and_others_fall_back() -> None:
    class Own(nn.Module):
        def scramble_(self, generator: torch.Generator) -> int:
            return 7

    assert randomise(Own(), torch.Generator()) == 7
    assert randomise(nn.Linear(2, 2), torch.Generator()) is None
    gated = nn.Sequential()
    gated.gate = nn.Linear(3, 1)  # a decision module by name: the generic redraw reaches it
    before = gated.gate.weight.clone()
    assert scramble_gates(gated, seed=3) == 2 and not torch.equal(before, gated.gate.weight)
