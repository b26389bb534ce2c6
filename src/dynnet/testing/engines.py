"""Run a test on the compiled kernels or on the pure-PyTorch reference kernels."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ENGINES", "kernel_engine"]

ENGINES = ("native", "torch")


@contextmanager
def kernel_engine(engine: str) -> Iterator[None]:
    """Within the block, kernels run on the compiled extension (``"native"``; the test is skipped where it
    cannot be built) or on the pure-PyTorch reference path (``"torch"``, as with ``DYNNET_NATIVE=0``).

    A context manager rather than a fixture, so hypothesis tests can use it inside the test body.
    """
    import pytest

    from dynnet.kernels import native

    if engine not in ENGINES:
        raise ValueError(f"unknown kernel engine {engine!r}; expected one of {ENGINES}")
    saved = os.environ.get("DYNNET_NATIVE")
    os.environ["DYNNET_NATIVE"] = "1" if engine == "native" else "0"
    try:
        if engine == "native" and native.load(warn=False) is None:
            pytest.skip(f"compiled kernels: {native.status()}")
        yield
    finally:
        if saved is None:
            os.environ.pop("DYNNET_NATIVE", None)
        else:
            os.environ["DYNNET_NATIVE"] = saved
