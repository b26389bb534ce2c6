"""Latency measurement and the realized-speedup ratio.

Realized speedup ratio = (dense latency / dynamic latency) ÷ (dense MACs / dynamic MACs): 1.0 means
every saved MAC was saved on the clock; below 1 means overheads (gathers, small kernels) ate part of it.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import torch
from torch import Tensor, nn
from torch.utils import benchmark

from dynnet.kernels import native

__all__ = ["STEADY_MALLOC", "Latency", "machine_info", "measure_latency", "realized_speedup", "steady_malloc"]

STEADY_MALLOC = "glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=33554432"
"""glibc malloc settings for timing: tensors up to 32 MiB come from the heap and freed memory is kept, so a
repeated call reuses its pages instead of faulting fresh ones in. With the defaults the heap is trimmed or
re-mapped depending on the process's allocation history: a dense BasicBlock at batch 16 (C = 128, 28×28, 2 threads)
took 2,162 minor page faults per call and 19.5–20.2 ms, against none and 17.2 ms with these settings."""


def steady_malloc() -> None:
    """Re-execute the running script with :data:`STEADY_MALLOC` in ``GLIBC_TUNABLES`` (Linux only; once: a process
    that already has ``GLIBC_TUNABLES`` set, e.g. by its shell, keeps it). Call it first in a
    benchmark's ``main``: dense and dynamic runs then time compute, not the allocator's page faults."""
    import sys

    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ:
        return
    env = dict(os.environ, GLIBC_TUNABLES=STEADY_MALLOC)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # the same command line (-u, -m, -c ...)


@dataclass(frozen=True)
class Latency:
    """Wall-clock latency of one call, in milliseconds (median and interquartile range of repeated runs)."""

    median_ms: float
    iqr_ms: float
    runs: int
    batch_size: int
    threads: int
    device: str

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def measure_latency(
    fn: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    threads: int | None = None,
    min_run_time: float = 1.0,
    warmup: int = 3,
) -> Latency:
    """Median latency of ``fn(x)`` under ``torch.no_grad()`` with ``torch.utils.benchmark``.

    Args:
        fn: a model or function of one Tensor[N, ...].
        x: the input batch.
        threads: CPU threads (default: ``torch.get_num_threads()``); stated in the result.
        min_run_time: seconds of measurement (blocked autorange).
        warmup: untimed calls first (caches, allocator, one-off probes).
    """
    threads = threads or torch.get_num_threads()
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        timer = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=threads, setup="import torch")
        m = timer.blocked_autorange(min_run_time=min_run_time)
    return Latency(
        median_ms=m.median * 1e3,
        iqr_ms=m.iqr * 1e3,
        runs=len(m.times),
        batch_size=x.shape[0],
        threads=threads,
        device=str(x.device),
    )


def realized_speedup(dense_ms: float, dynamic_ms: float, dense_macs: float, dynamic_macs: float) -> float:
    """(dense latency / dynamic latency) ÷ (dense MACs / dynamic MACs)."""
    if min(dense_ms, dynamic_ms, dense_macs, dynamic_macs) <= 0:
        raise ValueError("latencies and MACs must be positive")
    return (dense_ms / dynamic_ms) / (dense_macs / dynamic_macs)


def machine_info() -> dict[str, object]:
    """Machine, date and versions to store next to every benchmark result."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.uname().processor,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "loadavg_1m": round(load[0], 2),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "compiled_kernels": native.status(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
