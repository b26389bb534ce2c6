"""``steady_malloc`` re-executes a benchmark with glibc's malloc tuned for timing, once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dynnet.bench import machine_info
from dynnet.bench.latency import STEADY_MALLOC

SCRIPT = (
    "import os, sys; from dynnet.bench import steady_malloc; steady_malloc(); "
    "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])"
)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are Linux-only")
@pytest.mark.parametrize("preset", [None, "glibc.malloc.trim_threshold=1048576"])
def test_steady_malloc_reexecutes_once_with_the_same_command_line(preset: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if preset is not None:
        env["GLIBC_TUNABLES"] = preset
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, "--flag", "x"], env=env, capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()
    expected = STEADY_MALLOC if preset is None else preset  # a setting the caller made is kept
    assert out == f"{expected} ['--flag', 'x']"


def test_machine_info_records_the_malloc_settings(monkeypatch) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", STEADY_MALLOC)
    assert machine_info()["glibc_tunables"] == STEADY_MALLOC
