"""Measured dispatch: of several kernels that compute the same values, run the one that is fastest here.

A sparse kernel beats the dense computation it replaces only above some saving, which depends on the layer's shape,
the batch size, the density of the decisions, the number of threads and the machine: a padded grouped convolution
over 75 % of a block's channels is slower than the dense convolution on a CPU at batch 64, the gathers of a narrow
layer cost more than the convolution they skip. Guessing that crossover from MACs leaves sparse mode slower than
dense in places; this module measures it instead. :func:`choose` times every candidate once per *key* (the caller
puts in it what decides the winner: shapes, batch size, a density bucket) and caches the name of the fastest, so
later calls of the same key pay one dictionary lookup.

Measuring needs the candidates to be pure (no state written, no trace recorded) and is skipped — the caller then
falls back to its own rule — while something watches the ops (a MAC-counting dispatch mode, the profiler: timing
runs would be counted as work), under autograd, tracing or compilation, or when ``DYNNET_AUTOTUNE=0``. The test suite
turns it off (``tests/conftest.py``) so that the kernels' choices, and the MACs they record, do not depend on the
machine's speed; :func:`clock` can be replaced to test the dispatch itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Mapping

import torch

from dynnet.kernels import native

__all__ = ["cache_clear", "choices", "choose", "density_bucket", "enabled"]

_cache: dict[Hashable, str] = {}
_lock = threading.RLock()  # re-entrant: a candidate (a whole model) may call kernels that choose in turn
REPEATS = 3
"""Timed runs per candidate (after one warm-up run); the minimum counts."""

clock: Callable[[], float] = time.perf_counter
"""The clock the measurement reads (seconds); tests replace it."""


def enabled() -> bool:
    """Whether measured dispatch may run now: not turned off by ``DYNNET_AUTOTUNE=0``, no autograd, no tracing or
    compilation, nothing watching the ops at the dispatcher."""
    if native.env_off("DYNNET_AUTOTUNE"):
        return False
    if torch.is_grad_enabled() or native.observed():
        return False
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling())


def density_bucket(fraction: float, steps: int = 8) -> int:
    """``fraction`` in [0, 1] rounded to one of ``steps + 1`` buckets: decisions of similar density share a
    measurement."""
    return round(min(max(float(fraction), 0.0), 1.0) * steps)


def choose(key: Hashable, candidates: Mapping[str, Callable[[], object]]) -> str | None:
    """The name of the fastest candidate for ``key``: measured on the first call (each candidate run once to warm up,
    then :data:`REPEATS` times; the minimum wall time wins; ties go to the first), cached afterwards.

    Args:
        key: what determines the winner (the caller's shapes, batch size, density bucket...); the number of torch
            threads is added to it.
        candidates: name → a pure function computing the same values as the others; called only when measuring.

    Returns:
        The winner's name, or ``None`` when nothing is cached for ``key`` and measuring is not allowed now
        (:func:`enabled`): the caller then uses its own rule.
    """
    full = (key, torch.get_num_threads())
    found = _cache.get(full)
    if found is not None or not enabled():
        return found
    with _lock:
        found = _cache.get(full)
        if found is not None:
            return found
        best, best_time = None, float("inf")
        for name, run in candidates.items():
            run()  # warm-up: allocations, caches, a lazy build
            elapsed = float("inf")
            for _ in range(REPEATS):
                start = clock()
                run()
                elapsed = min(elapsed, clock() - start)
            if elapsed < best_time:
                best, best_time = name, elapsed
        if best is not None:
            _cache[full] = best
        return best


def choices() -> dict[Hashable, str]:
    """A copy of the cache: ``(key, threads) → winner``."""
    return dict(_cache)


def cache_clear() -> None:
    """Forget every measurement (a new machine load, threads or weights: measure again)."""
    _cache.clear()
