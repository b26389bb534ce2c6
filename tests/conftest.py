"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Measured dispatch (dynnet.kernels.autotune) picks kernels by wall-clock time: off in the tests, so that the kernels'
# choices and the MACs they record do not depend on the machine's speed or load (tests/kernels/test_kernels_autotune.py
# turns it on with a fake clock; DYNNET_AUTOTUNE=1 runs the suite with it on).
os.environ.setdefault("DYNNET_AUTOTUNE", "0")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test: small models and tiny kernels, where on a shared CPU a second OpenMP thread
    only spins. Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, float]]:
    """Measured dispatch on, with a clock that reads ``clock["t"]``: candidates advance it by their declared cost."""
    from dynnet.kernels import autotune

    monkeypatch.setenv("DYNNET_AUTOTUNE", "1")
    now = {"t": 0.0}
    monkeypatch.setattr(autotune, "clock", lambda: now["t"])
    autotune.cache_clear()
    yield now
    autotune.cache_clear()
