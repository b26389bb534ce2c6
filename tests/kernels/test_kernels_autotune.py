"""`dynnet.kernels.autotune`: the fastest candidate wins, once per key, and measuring stays out of the way."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from dynnet.kernels import autotune


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, float]]:
    """Autotune on, with a clock that each candidate advances by its declared cost."""
    monkeypatch.setenv("DYNNET_AUTOTUNE", "1")
    now = {"t": 0.0}
    monkeypatch.setattr(autotune, "clock", lambda: now["t"])
    autotune.cache_clear()
    yield now
    autotune.cache_clear()


def _candidates(now: dict[str, float], costs: dict[str, float], calls: list[str]) -> dict:
    def run(name: str) -> None:
        calls.append(name)
        now["t"] += costs[name]

    return {name: (lambda name=name: run(name)) for name in costs}


def test_the_fastest_candidate_wins_and_is_measured_once_per_key(fake_clock: dict[str, float]) -> None:
    calls: list[str] = []
    with torch.no_grad():
        assert autotune.choose("k1", _candidates(fake_clock, {"sparse": 3.0, "dense": 2.0}, calls)) == "dense"
        assert calls == ["sparse"] * (1 + autotune.REPEATS) + ["dense"] * (1 + autotune.REPEATS)
        calls.clear()
        assert autotune.choose("k1", _candidates(fake_clock, {"sparse": 1.0, "dense": 2.0}, calls)) == "dense"
        assert calls == []  # cached: nothing runs again
        assert autotune.choose("k2", _candidates(fake_clock, {"sparse": 1.0, "dense": 2.0}, calls)) == "sparse"
    assert {k[0]: v for k, v in autotune.choices().items()} == {"k1": "dense", "k2": "sparse"}


def test_nothing_is_measured_under_autograd_a_dispatch_mode_or_when_turned_off(
    fake_clock: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    calls: list[str] = []
    costs = {"sparse": 1.0, "dense": 2.0}
    assert torch.is_grad_enabled()
    assert autotune.choose("k", _candidates(fake_clock, costs, calls)) is None  # autograd on
    with torch.no_grad(), FlopCounterMode(display=False):
        assert autotune.choose("k", _candidates(fake_clock, costs, calls)) is None  # timing runs would be counted
    monkeypatch.setenv("DYNNET_AUTOTUNE", "0")
    with torch.no_grad():
        assert autotune.choose("k", _candidates(fake_clock, costs, calls)) is None
    assert calls == [] and autotune.choices() == {}


def test_density_bucket_rounds_and_clamps() -> None:
    assert [autotune.density_bucket(f) for f in (-0.2, 0.0, 0.3, 0.5, 0.99, 1.4)] == [0, 0, 2, 4, 8, 8]
