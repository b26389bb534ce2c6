"""`dynnet.kernels.autotune`: the fastest candidate wins, once per key, and measuring stays out of the way."""

from __future__ import annotations

import pytest
import torch

from dynnet.kernels import autotune


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


def test_sliced_pair_runs_the_measured_faster_strategy_with_the_same_values(
    fake_clock: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With dense timed faster, ``auto`` runs dense (executed = every channel); the values equal the sliced run."""
    from dynnet.kernels import channel
    from dynnet.kernels.channel import _sliced

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 6, 6, generator=gen)
    w1, b1 = torch.randn(6, 4, 3, 3, generator=gen), torch.randn(6, generator=gen)
    w2, b2 = torch.randn(5, 6, 3, 3, generator=gen), torch.randn(5, generator=gen)
    scale = (torch.rand(8, 6, generator=gen) > 0.4).float()
    assert 0 < scale.sum() < scale.numel() and torch.unique(scale, dim=0).shape[0] > 1  # mixed, distinct masks
    spec = channel.ConvSpec(stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    real = _sliced._run_pair

    def timed(how: str, *args):  # the fake clock: dense costs 1, any sliced strategy 5
        fake_clock["t"] += 1.0 if how == "dense" else 5.0
        return real(how, *args)

    monkeypatch.setattr(_sliced, "_run_pair", timed)
    with torch.no_grad():
        fixed, fixed_exec = channel.sliced_pair(x, w1, b1, w2, b2, scale, spec, spec, strategy="per_sample")
        y, executed = channel.sliced_pair(x, w1, b1, w2, b2, scale, spec, spec)
    assert torch.allclose(y, fixed, atol=1e-5) and torch.equal(executed, torch.full((8,), 6.0, dtype=torch.float64))
    assert bool((fixed_exec < 6).any()) and list(autotune.choices().values()) == ["dense"]


def test_a_candidate_may_choose_in_turn(fake_clock: dict[str, float]) -> None:
    # a model-level choice (per sample or batched) runs kernels that make their own choice while it is measured
    calls: list[str] = []
    inner = _candidates(fake_clock, {"sliced": 1.0, "dense": 2.0}, calls)

    def outer(cost: float) -> None:
        assert autotune.choose("inner", inner) == "sliced"
        fake_clock["t"] += cost

    with torch.no_grad():
        assert autotune.choose("outer", {"a": lambda: outer(5.0), "b": lambda: outer(3.0)}) == "b"
    assert {k[0] for k in autotune.choices()} == {"inner", "outer"}
