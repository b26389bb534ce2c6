"""The ``dynnet`` command's argument types and shared options (standard library only).

Each type turns one command-line value into a Python value or refuses it with a one-line usage error ("expected
..., got ..."): :mod:`dynnet.cli` builds its parser from them and :mod:`dynnet.bench.suite` its ``--profile``
options, both without loading torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any

__all__: list[str] = []  # private to the command line and the benchmark suite's options


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 3,224,224, got {text!r}") from None
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (three positive integers), got {text!r}")
    return dims


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _checked(text: str, cast: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Any:
    """``cast(text)`` if it converts and passes ``ok``; else the one-line usage error "expected ..., got ..."."""
    try:
        value = cast(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``: the value read as JSON when it is (numbers, booleans, lists become tuples), else
    as text."""
    key, eq, raw = text.partition("=")
    if not eq or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a setting of the recipe), got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), tuple(value) if isinstance(value, list) else value


def _count(text: str) -> int:
    """A positive integer: epochs, steps, batch sizes, threads."""
    return _checked(text, int, lambda v: v >= 1, "a positive integer")


def _count0(text: str) -> int:
    """An integer >= 0 (where 0 means "all" or "never": ``--subset``, ``--checkpoint-every``, ``--depth``)."""
    return _checked(text, int, lambda v: v >= 0, "an integer >= 0")


def _seed(text: str) -> int:
    """A seed: torch takes 64-bit seeds, and the loaders derive others from it by multiplication."""
    return _checked(text, int, lambda v: 0 <= v < 2**31, "an integer in [0, 2**31)")


def _positive(text: str) -> float:
    """A finite positive number: learning rates, width multipliers, times."""
    return _checked(text, float, lambda v: math.isfinite(v) and v > 0, "a positive number")


def _nonnegative(text: str) -> float:
    """A finite number >= 0: loss weights."""
    return _checked(text, float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")


def _fraction(text: str) -> float:
    """A fraction in (0, 1]: budgets and MAC fractions."""
    return _checked(text, float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")


def _open_fraction(text: str) -> float:
    """A fraction in (0, 1): tolerances."""
    return _checked(text, float, lambda v: 0 < v < 1, "a fraction in (0, 1)")


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )  # fmt: skip


def _progress(args: argparse.Namespace) -> bool:
    """``--progress`` / ``--no-progress``, else whether stderr is a terminal (no bar in a log file or a pipe)."""
    if args.progress is not None:
        return args.progress
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


def _add_grey_to_rgb(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grey-to-rgb", action="store_true",
        help="repeat a grey dataset's images to 3 channels, for networks made for RGB images (torchvision's)",
    )  # fmt: skip


def _dataset_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The options of :func:`dynnet.data.build_loaders` that the command line sets."""
    return {"channels": 3} if args.grey_to_rgb else {}
