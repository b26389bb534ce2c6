"""Compiled CPU kernels: a small C++/OpenMP extension, built on first use, with a pure-PyTorch fallback.

The sources live in ``dynnet/kernels/_native/``. :func:`load` compiles them once per source, compiler flags, CPU
and torch version with :func:`torch.utils.cpp_extension.load` (needs a C++ compiler such as g++, and ``ninja``, a
dependency of dynnet) into ``$DYNNET_CACHE/native`` (default ``~/.cache/dynnet/native``) and imports the result.
When that is not possible the callers run their pure-PyTorch code, which is also the reference the compiled
kernels are tested against, and :func:`load` warns once with the reason and what to install. ``DYNNET_NATIVE=0``
turns the compiled kernels off (no build, no warning). ``scripts/setup.sh`` builds the extension by calling
:func:`status`, which prints nothing and reports whether it is available.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["direct", "disabled", "env_off", "load", "observed", "status"]

_DIR = Path(__file__).with_name("_native")
_SOURCES = tuple(
    _DIR / name
    for name in ("module.cpp", "gather.cpp", "sparse.cpp", "channel.cpp", "channel_tile.cpp", "recipe_channel.cpp")
)
_HEADERS = (_DIR / "native.h", _DIR / "channel_conv.h")
# Built on the machine that runs it, so it may use that CPU's vector instructions (the CPU is in the build key).
_CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp")  # at::parallel_for is OpenMP in ATen
_LDFLAGS = ("-fopenmp",)
_lock = threading.Lock()
_state: dict[str, object] = {}


_OFF = {"0", "false", "off", "no"}
_env_seen: dict[str, tuple[str | None, bool]] = {}


def env_off(name: str) -> bool:
    """Whether the environment variable ``name`` is set to ``0`` / ``false`` / ``off`` / ``no`` (any case).

    Called on hot paths (once per kernel call), so a variable is parsed only when its value changes.
    """
    value = os.environ.get(name)
    seen = _env_seen.get(name)
    if seen is None or seen[0] != value:
        seen = _env_seen[name] = (value, value is not None and value.strip().lower() in _OFF)
    return seen[1]


def disabled() -> bool:
    """Whether ``DYNNET_NATIVE=0`` (or ``false``/``off``/``no``) turns the compiled kernels off."""
    return env_off("DYNNET_NATIVE")


def observed() -> bool:
    """Whether something watches ops at the dispatcher: a dispatch mode (dynnet's MAC counter, ...) or the profiler.

    Compiled calls then go through their dispatcher ops (``torch.ops.dynnet.*``); otherwise through the extension's
    direct bindings of the same functions (:func:`direct`), which skip ~2 µs of dispatch per call at batch 1.
    """
    return bool(torch._C._len_torch_dispatch_stack()) or torch.autograd.profiler._is_profiler_enabled


def direct(name: str):
    """The extension's direct (pybind) binding of the dispatcher op ``torch.ops.dynnet.<name>``: the same function,
    invisible to dispatch modes and the profiler (use it only when :func:`observed` is false). The extension must
    be loaded."""
    ext = _state.get("module")
    if ext is None:
        raise RuntimeError("dynnet.kernels.native.direct: the extension is not loaded (call load() first)")
    return getattr(ext, name)


def _cache_dir() -> Path:
    root = os.environ.get("DYNNET_CACHE") or str(Path.home() / ".cache" / "dynnet")
    return Path(root) / "native"


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags (a binary built with ``-march=native`` runs only on such a CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _build_name() -> str:
    """A module name unique to the sources, the flags, the CPU and the torch/Python build (a stale binary is
    never loaded)."""
    h = hashlib.sha256()
    for src in (*_SOURCES, *_HEADERS):
        h.update(src.read_bytes())
    h.update(_cpu_signature().encode())
    h.update(" ".join(_CFLAGS).encode())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{sys.platform}".encode())
    return f"dynnet_native_{h.hexdigest()[:16]}"


def _tool_dirs() -> list[str]:
    """Where the ``ninja`` of this environment lives (the pip package), which ``cpp_extension`` looks up on
    ``PATH``: an environment used without activating it (``.venv/bin/python ...``) has it off ``PATH``."""
    dirs = [str(Path(sys.executable).parent)]
    try:
        import ninja

        dirs.append(str(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    return dirs


def _build(verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    name = _build_name()
    build_dir = _cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([*_tool_dirs(), saved])
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(s) for s in _SOURCES],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(build_dir),
            verbose=verbose,
        )
    finally:
        os.environ["PATH"] = saved


def load(*, verbose: bool = False, warn: bool = True) -> ModuleType | None:
    """The compiled extension, building it on the first call; ``None`` when it is off or cannot be built.

    Args:
        verbose: show the compiler's output.
        warn: warn (once per process) with the reason when the extension is unavailable.

    Returns:
        The extension module (functions ``gather_im2col``...), or ``None``.
    """
    module = _state.get("module")
    if module is not None or "error" in _state:
        return None if disabled() else module  # type: ignore[return-value]
    if disabled():
        return None
    with _lock:
        if "module" not in _state and "error" not in _state:
            try:
                _state["module"] = _build(verbose)
            except Exception as exc:  # compiler, ninja or headers missing; a compile error
                _state["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"
                if warn:
                    warnings.warn(
                        "dynnet: the compiled CPU kernels are unavailable, using the pure-PyTorch kernels "
                        f"(same results, slower) — {_state['error']}. To build them install a C++ compiler "
                        "(e.g. apt-get install g++) and `pip install ninja`; DYNNET_NATIVE=0 silences this.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
    return _state.get("module")  # type: ignore[return-value]


def status() -> str:
    """``"available"``, ``"disabled (DYNNET_NATIVE=0)"`` or ``"unavailable: <reason>"`` (builds if needed)."""
    if disabled():
        return "disabled (DYNNET_NATIVE=0)"
    return "available" if load(warn=False) is not None else f"unavailable: {_state.get('error')}"
