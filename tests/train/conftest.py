"""One torch thread per test: the tests train small models, and on a shared CPU a second OpenMP thread only spins."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _train_tests_use_one_thread(one_thread: None) -> None:
    """Every test under tests/train runs with the shared ``one_thread`` fixture."""
