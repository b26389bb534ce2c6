"""Every ``dynnet`` subcommand under bad arguments, through the real entry point (``python -m dynnet``).

The subcommands and their options are read from the real parser (:func:`dynnet.cli.build_parser`), so a new
subcommand or option is driven without editing this file. Each bad command line must end with exit status 2 and
exactly one ``dynnet: error: ...`` line on stderr, no traceback, and no file created or changed in the working
directory (``dynnet train`` writes ``runs/quickstart`` there by default).

Each case is a fresh process: about 0.1 s when the parser refuses it, a few seconds when the command has to import
torch first (a missing checkpoint, ``dynnet bench``, whose parser holds the suite's options); about 40 s in all.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dynnet import cli, cli_args
from dynnet.bench import suite

BAD_VALUE: dict[Callable[[str], Any], str] = {
    cli_args._count: "0",
    cli_args._count0: "-1",
    cli_args._seed: "-1",
    cli_args._positive: "0",
    cli_args._nonnegative: "-1",
    cli_args._fraction: "1.5",
    cli_args._open_fraction: "1",
    cli_args._ints: "0",
    cli_args._shape: "3,0,32",
    cli_args._setting: "no_value",
    suite._budgets: "0.5,0",
    suite._seeds: "-1",
}
"""An out-of-range value for each checked type of the parser."""
COUNTS = (cli_args._count, cli_args._count0, cli_args._ints, suite._seeds)
BUDGETS = (cli_args._fraction, cli_args._open_fraction, suite._budgets)
REQUIRED = {"model": "cifar_resnet8", "out": "out", "macs": "0.5", "budget": "0.5"}
"""Valid values of the required options that are not paths."""
PATHS = ("checkpoint", "init")
"""Options that name a file or folder: given a path that does not exist."""
NOWHERE = "no/such/path"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser(suite=True)
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _cases(name: str, parser: argparse.ArgumentParser) -> list[tuple[str, list[str]]]:
    """``(what, argv)``: the bad command lines of subcommand ``name``."""
    options = _options(parser)
    base = [name]
    for action in (a for a in options if a.required):
        if action.dest not in REQUIRED and action.dest not in PATHS:
            raise AssertionError(f"{name} {action.option_strings[0]} is required: add a valid value to REQUIRED")
        base += [action.option_strings[0], NOWHERE if action.dest in PATHS else REQUIRED[action.dest]]

    def first(types: tuple[Callable[[str], Any], ...]) -> argparse.Action | None:
        return next((a for a in options if a.type in types), None)

    cases = [("unknown option", [*base, "--no-such-option", "1"])]
    typed = next((a for a in options if a.type is not None and a.choices is None), None)
    if typed is not None:
        cases.append(("not a number", [*base, typed.option_strings[0], "many"]))
    for what, types in (("count out of range", COUNTS), ("budget out of range", BUDGETS)):
        action = first(types)
        if action is not None:
            cases.append((what, [*base, action.option_strings[0], BAD_VALUE[action.type]]))
    for action in (a for a in options if a.dest in SUITE_CHECKED and name == "bench"):
        cases.append((f"bad {action.dest}", [*base, action.option_strings[0], BAD_VALUE[action.type]]))
    choice = next((a for a in parser._actions if not a.option_strings and a.choices), None)
    if choice is not None:
        cases.append(("not one of the choices", [*base, "no_such_choice"]))
    if any(a.required for a in options):
        cases.append(("missing required option", [name]))
    path = next((a for a in options if a.dest in PATHS), None)
    if path is not None:
        cases.append(("nonexistent path", base if path.required else [*base, path.option_strings[0], NOWHERE]))
    return cases


SUBCOMMANDS = _subcommands()


def _suite_checked() -> set[str]:
    """The options the benchmark suite adds whose values the parser checks (each gets a bad-value case)."""
    parser = argparse.ArgumentParser()
    suite.add_suite_arguments(parser)
    return {a.dest for a in _options(parser) if a.type is not None}


SUITE_CHECKED = _suite_checked()


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                     p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }  # fmt: skip


def test_every_checked_type_has_a_bad_value() -> None:
    types = {a.type for p in SUBCOMMANDS.values() for a in _options(p) if a.type is not None}
    mine = {t for t in types if getattr(t, "__module__", None) in (cli.__name__, cli_args.__name__, suite.__name__)}
    assert mine <= BAD_VALUE.keys(), f"add a bad value for {mine - BAD_VALUE.keys()}"


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_bad_arguments_exit_2_with_one_error_line_and_touch_nothing(name: str, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("the user's file\n")
    before = _snapshot(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = str(Path(cli.__file__).resolve().parents[1])  # the dynnet being tested, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    failures = []
    for what, argv in _cases(name, SUBCOMMANDS[name]):
        proc = subprocess.run(
            [sys.executable, "-m", "dynnet", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
        )
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        ok = proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("dynnet: error:")
        if not ok or "Traceback" in proc.stderr:
            failures.append(f"{what}: dynnet {' '.join(argv)} -> status {proc.returncode}, stderr:\n{proc.stderr}")
        if _snapshot(tmp_path) != before:
            failures.append(f"{what}: dynnet {' '.join(argv)} changed the working directory: {_snapshot(tmp_path)}")
            before = _snapshot(tmp_path)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(("option", "value"), [("--budgets", "x"), ("--budgets", "0.5,1.5"), ("--seeds", "0,a")])
def test_suite_lists_are_refused_naming_the_option(option: str, value: str) -> None:
    """``dynnet bench --budgets x`` is refused by the parser, naming the option, before any job starts."""
    proc = subprocess.run(
        [sys.executable, "-m", "dynnet", "bench", "--profile", "quick", option, value],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"argument {option}: expected" in lines[0] and repr(value) in lines[0], lines[0]
