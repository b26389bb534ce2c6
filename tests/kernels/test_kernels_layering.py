"""The kernel floor is pure: importing any kernels module loads no model, block, recipe or conversion code."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import dynnet.kernels

ABOVE = ("dynnet.core", "dynnet.convert", "dynnet.models", "dynnet.methods", "dynnet.gates", "dynnet.blocks")
# Every module and subpackage (dynnet.kernels.channel and its modules included), relative to dynnet.kernels.
MODULES = sorted(
    m.name.removeprefix("dynnet.kernels.") for m in pkgutil.walk_packages(dynnet.kernels.__path__, "dynnet.kernels.")
)


def test_there_are_kernel_modules_to_check() -> None:
    assert {"chain", "spatial", "channel", "block", "compaction"} <= set(MODULES)


def _loaded_above(module: str) -> list[str]:
    """The modules above the kernels that a fresh interpreter holds after importing ``module``."""
    code = (
        f"import json, sys; import {module}; "
        f"print(json.dumps(sorted(k for k in sys.modules if k.startswith({ABOVE!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_check_sees_a_module_that_imports_from_above() -> None:
    assert "dynnet.core" in _loaded_above("dynnet.blocks.spatial")  # the spatial block builds on core


@pytest.mark.parametrize("module", MODULES)
def test_a_kernel_module_imports_nothing_above_the_kernels(module: str) -> None:
    assert _loaded_above(f"dynnet.kernels.{module}") == []
