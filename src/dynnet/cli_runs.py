"""The run folder of ``dynnet train`` / ``quickstart``: claimed with the run's settings before training, resumed
by the same command, refused (one line) to a command with other settings unless ``--force``.

Standard library only (imported with :mod:`dynnet.cli`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["RUN_FILE"]


RUN_FILE = "run.json"
"""What ``dynnet train`` writes into its run folder before training: the settings of the run, to compare with."""
_ADDED_SETTINGS = {"max_steps": None, "grey_to_rgb": False}
"""Settings a run folder made by an older dynnet does not record, and the value they had then (it resumes)."""
_RUN_FILES = (
    RUN_FILE, "results.json", "log.csv", "checkpoint.json", "checkpoint.safetensors", "checkpoint.optim.safetensors",
    "checkpoint.safetensors.prev", "checkpoint.optim.safetensors.prev",
)  # fmt: skip
"""The files of a ``dynnet train`` run folder (``fit``'s checkpoint, its log, the experiment's results)."""


def _held_run_files(out: Path) -> list[str]:
    """The files of a run that ``out`` holds (``run.json`` alone is no run: a start that failed before training)."""
    return [name for name in _RUN_FILES if name != RUN_FILE and (out / name).exists()]


def _claim_run_folder(out: Path, settings: dict[str, Any], *, force: bool) -> tuple[str, list[Path]]:
    """Make ``out`` this run's folder.

    A folder without a run is claimed: ``run.json`` (the settings) is written. A run with the same settings is
    resumed, or left as it is when it finished (it has its ``results.json``). A run with other settings, or with
    settings this command cannot read (written by hand or by an older dynnet), is refused with one line, unless
    ``force``: then its run files are deleted first. Nothing of a run is overwritten without ``force``; a
    ``run.json`` alone (a start that failed before training) is no run.

    Returns:
        ``(state, created)``: ``"new"``, ``"resume"`` (an unfinished run) or ``"finished"``, and the folders this call
        created (for :func:`_release_run_folder`).
    """
    found = _held_run_files(out)
    if found and not force:
        before = _run_settings(out)
        if before is None:
            raise ValueError(
                f"{out} already holds a run ({', '.join(found[:3])}) whose settings dynnet cannot read: pass --force "
                "to replace it, or choose another --out"
            )
        changed = [key for key in settings if before.get(key) != settings[key]]
        if changed:
            diff = "; ".join(f"{k} {before.get(k)!r} there, {settings[k]!r} now" for k in changed[:4])
            raise ValueError(
                f"{out} holds a run with other settings ({diff}): pass --force to replace it, the same settings to "
                "resume it, or another --out"
            )
        if (out / "results.json").is_file():
            return "finished", []
        print(f"dynnet: {out} holds an unfinished run with these settings: resuming it (--force starts it again)")
        return "resume", []
    for name in found:  # force: nothing of the old run may mix with the new one
        (out / name).unlink()
    created = [d for d in (out, *out.parents) if not d.exists()][::-1]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps({"format": "dynnet-run", "settings": settings}, indent=1))
    os.replace(tmp, out / RUN_FILE)
    return "new", created


def _release_run_folder(out: Path, created: list[Path]) -> None:
    """Undo :func:`_claim_run_folder` after a start that failed before anything of the run was written."""
    if any((out / name).exists() for name in _RUN_FILES if name != RUN_FILE):
        return  # training began: run.json stays, so that the same command resumes
    (out / RUN_FILE).unlink(missing_ok=True)
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # not empty (tb/, a file of the user's): leave it
            break


def _finished_run(out: Path) -> str:
    """One line on the finished run in ``out`` (from its ``results.json``)."""
    what = ""
    try:
        t = json.loads((out / "results.json").read_text())["test"]
        what = (
            f"test accuracy {100 * t['accuracy']:.2f} % ({t['mode']}), {100 * t['mac_fraction']:.1f} % of dense MACs; "
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return (
        f"dynnet: {out} already holds this run, finished: {what}results in {out / 'results.json'} "
        "(--force trains it again)"
    )


def _run_settings(out: Path) -> dict[str, Any] | None:
    """The settings of the run in ``out`` (its ``run.json``, else the ``settings`` of its ``results.json``)."""
    for name in (RUN_FILE, "results.json"):
        try:
            data = json.loads((out / name).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("settings"), dict):
            settings = {**_ADDED_SETTINGS, **data["settings"]}
            settings["model_kwargs"] = settings.get("model_kwargs") or {}
            return settings
    return None
