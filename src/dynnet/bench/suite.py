"""The benchmark suite: every registered recipe and a family of static baselines on the same footing.

For one base network and one dataset, :func:`run_suite` trains (with :func:`dynnet.train.fit`), tests (with
:func:`dynnet.train.evaluate` in **sparse** mode, i.e. with the work really skipped) and times (with
:func:`dynnet.bench.harness.profile_model`, dense vs sparse at batch 1 and 64):

- static baselines: CIFAR ResNets at several depths (``6n + 2``) and width multipliers — the "baseline models of
  different complexities" the reading list measures dynamic networks against; their (MACs, accuracy) points give
  the static Pareto front (:mod:`dynnet.bench.report`);
- every registered recipe (``dynnet.list_recipes()`` at run time) at each budget of the profile.

Every job uses the same data, schedule and seeds. Each finished job writes ``out_dir/runs/<job>.json`` atomically
and is never recomputed while its settings are unchanged (the suite is resumable: interrupt it and run it again).
A job that fails records its error in its row; the suite goes on. At the end the table (``results.csv``,
``results.json``), the plots (:mod:`dynnet.bench.plots`) and ``report.md`` (:mod:`dynnet.bench.report`) are
written from all the rows. What runs is planned in :mod:`dynnet.bench.plan` (profiles, jobs); one job is run by
:func:`dynnet.bench.jobs.run_job`; this module runs the plan, resumably, and holds the command line.

Base network of a recipe: the profile's base when the recipe converts it; otherwise (a recipe that needs stages
of ≥ 2 residual blocks, or its own architecture such as MSDNet) the recipe's own ``RecipeSpec.test_base`` at the
profile's width, then at its default width. The row says which base was used.

Example:
    >>> from dynnet.bench.plan import PROFILES
    >>> from dynnet.bench.suite import run_suite
    >>> rows = run_suite(PROFILES["quick"], "benchmarks/results/suite/quick")
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dynnet.bench.jobs import JobData, example_payload, load_data, run_job
from dynnet.bench.plan import PROFILES, BenchProfile, Job, json_default, plan_jobs
from dynnet.cli_args import _checked, _count, _count0  # the command line's number checks (stdlib only)

__all__ = ["add_suite_arguments", "bench_main", "profile_from_args", "run_suite"]

logger = logging.getLogger("dynnet.bench.suite")


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a crash never leaves a half-written run file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Compact (one line): the committed results stay lean; `python -m json.tool` pretty-prints one for reading.
    tmp.write_text(json.dumps(obj, separators=(",", ":"), default=json_default, allow_nan=True))
    os.replace(tmp, path)


def _finished(path: Path, settings: dict[str, Any], retry_errors: bool) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        row = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if not _current(row, settings):
        return None
    if retry_errors and row.get("status") != "ok":
        return None
    return row


def _current(row: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether a stored row was made with ``settings`` (:meth:`Job.settings`, compared in their JSON form)."""
    return row.get("settings") == json.loads(json.dumps(settings, default=json_default))


def mark_stale(rows: list[dict[str, Any]], profile: BenchProfile) -> list[dict[str, Any]]:
    """Mark (``stale: True``) the rows whose stored settings differ from what ``profile`` would run today (a changed
    fine-tune default, schedule or timing setting): the next run recomputes them; until then the report shows them
    apart and keeps them out of the headline. Rows of jobs the profile no longer plans are left as they are."""
    current = {job.id: job.settings(profile) for job in plan_jobs(profile, None)}
    for row in rows:
        settings = current.get(str(row.get("job")))
        row["stale"] = settings is not None and not _current(row, settings)
    return rows


def run_suite(
    profile: BenchProfile,
    out_dir: str | os.PathLike[str],
    recipes: Sequence[str] | None = None,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    report: bool = True,
) -> list[dict[str, Any]]:
    """Run every job of the suite once (resumable), then write the table, plots and report.

    Args:
        profile: the :class:`BenchProfile`.
        out_dir: results folder: ``runs/<job>.json`` per job, ``results.csv``/``results.json``, ``*.png``,
            ``report.md``, ``suite.log``.
        recipes: recipe names (default: every registered recipe).
        checkpoint_dir: keep each job's checkpoint there (and reload a finished one instead of retraining); default
            with ``profile.trained_budget``: ``out_dir/checkpoints`` (git-ignored).
        retry_errors: run again the jobs whose stored row is an error (default: a failed job counts as finished).
        progress: tqdm progress bar over the jobs.
        report: write the table, plots and report at the end.

    Returns:
        One row per job (dicts; ``status`` is ``"ok"``, ``"error"``, or ``"unreachable"`` for a budget outside the
        recipe's declared range, which is not run).
    """
    from dynnet.bench.latency import machine_info

    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "suite.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("dynnet").addHandler(handler)
    previous_level = logging.getLogger("dynnet").level
    if previous_level == logging.NOTSET or previous_level > logging.INFO:
        logging.getLogger("dynnet").setLevel(logging.INFO)
    if checkpoint_dir is None and profile.trained_budget is not None:  # calibrated jobs load the trained ones
        checkpoint_dir = out / "checkpoints"
        checkpoint_dir.mkdir(exist_ok=True)
        (checkpoint_dir / ".gitignore").write_text("*\n")  # weights stay out of the committed results
    previous_threads = torch.get_num_threads()
    if profile.train_threads:
        torch.set_num_threads(profile.train_threads)
    try:
        jobs = plan_jobs(profile, recipes)
        _check_init(profile, {job.dataset for job in jobs})
        logger.info("suite %s: %d jobs, out_dir %s", profile.name, len(jobs), out)
        _write_json(out / "profile.json", profile.as_dict())
        rows: list[dict[str, Any]] = []
        data_cache: dict[tuple[str, int], JobData] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc=f"suite {profile.name}", dynamic_ncols=True)
        ran = 0
        for job in jobs:
            settings = job.settings(profile)
            path = out / "runs" / f"{job.id}.json"
            row = _finished(path, settings, retry_errors)
            if row is None and (refused := _out_of_range(job)) is not None:
                row = refused | {"settings": settings}
                _write_json(path, row)
            if row is None:
                ran += 1
                row = _run_one(job, profile, data_cache, out, settings, checkpoint_dir)
                _write_json(path, row)
            rows.append(row)
            if bar is not None:
                bar.set_postfix_str(f"{job.id} {row.get('status')}")
                bar.update(1)
        if bar is not None:
            bar.close()
        logger.info("suite %s: ran %d jobs, reused %d", profile.name, ran, len(jobs) - ran)
        if report:
            from dynnet.bench.report import write_outputs

            write_outputs(rows, out, profile=profile.as_dict(), machine=machine_info())  # current by construction
        return rows
    finally:
        torch.set_num_threads(previous_threads)
        logging.getLogger("dynnet").removeHandler(handler)
        logging.getLogger("dynnet").setLevel(previous_level)
        handler.close()


def _check_init(profile: BenchProfile, datasets: set[str]) -> None:
    """Refuse a profile that starts from shipped weights the package does not have (one line saying how to make
    them), before any job runs."""
    if profile.init != "zoo":
        return
    from dynnet.zoo import shipped

    for data in sorted(datasets):
        key = profile.init_for(data).split(":", 1)[1]  # type: ignore[union-attr]
        if key not in shipped():
            raise ValueError(
                f"profile {profile.name!r} fine-tunes from the shipped {key!r}, which this installation lacks: make it "
                f"with `dynnet pretrain --model {profile.base} --data {data} --out runs/pretrain/{key}` and "
                "dynnet.zoo.ship(that folder)"
            )


def _out_of_range(job: Job) -> dict[str, Any] | None:
    """The row of a recipe job whose budget lies outside the recipe's declared reachable range (not run: the
    conversion would refuse it), or ``None``."""
    from dynnet.core import RECIPES

    if job.kind != "recipe" or job.budget is None:
        return None
    spec = RECIPES.get(job.recipe)
    lo, hi = spec.budget.reachable
    if lo - 1e-9 <= job.budget <= hi + 1e-9:
        return None
    return {
        "job": job.id, "kind": job.kind, "recipe": job.recipe, "family": spec.family, "model": job.model,
        "width": job.width, "depth": job.depth, "budget": job.budget, "seed": job.seed, "dataset": job.dataset,
        "status": "unreachable", "error": f"budget {job.budget:g} is outside the declared reachable [{lo:g}, {hi:g}]",
    }  # fmt: skip


def _run_one(
    job: Job,
    profile: BenchProfile,
    data_cache: dict[tuple[str, int], JobData],
    out: Path,
    settings: dict[str, Any],
    checkpoint_dir: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    from dynnet.bench.latency import machine_info

    started = time.time()
    logger.info("job %s: start", job.id)
    try:
        key = (job.dataset, job.seed)
        if key not in data_cache:
            data_cache[key] = load_data(profile, job.dataset, job.seed)
            examples_path = out / "examples" / f"{_safe(job.dataset)}.json"
            if not examples_path.exists():
                _write_json(examples_path, example_payload(data_cache[key]))
        row = run_job(job, profile, data_cache[key],
                      checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir))  # fmt: skip
        logger.info("job %s: accuracy %.4f, MAC fraction %.3f, %.1f s", job.id, row["accuracy"],
                    row["mac_fraction"], time.time() - started)  # fmt: skip
    except Exception as err:
        logger.error("job %s failed: %s: %s", job.id, type(err).__name__, err)
        row = {
            "job": job.id, "kind": job.kind, "recipe": job.recipe or "static", "model": job.model,
            "width": job.width, "depth": job.depth, "budget": job.budget, "seed": job.seed, "dataset": job.dataset,
            "status": "error", "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(limit=8)[-4000:],
        }  # fmt: skip
        with contextlib.suppress(Exception):
            from dynnet.core import RECIPES

            row["family"] = RECIPES.get(job.recipe).family if job.recipe else "static"
    row["settings"] = settings
    row["machine"] = machine_info()
    row["wall_seconds"] = round(time.time() - started, 2)
    row["finished"] = time.time()
    return row


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


# ------------------------------------------------------------------------------------------------------ CLI


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the suite's options (``--profile``, ``--out``, ``--recipes``...) to ``parser``.

    Used by ``dynnet bench``; an option the parser already has (its ``--threads``) is kept as it is.
    """

    def add(flag: str, **kwargs: Any) -> None:
        if flag not in parser._option_string_actions:  # argparse has no public "has option"
            parser.add_argument(flag, **kwargs)

    add(
        "--profile",
        default=None,
        choices=sorted(PROFILES),
        help="run the benchmark suite with this profile (quick, standard, full; a family's: layer_skip, early_exit, "
        "channel, convnet_aig, spatial, glimpse; budget: the calibration check, no training; speed_<network>: "
        "sparse vs dense time on a deployed network at 224; latency, latency_resnet18: latency budgets)",
    )
    add("--out", default=None, help="suite results folder (default benchmarks/results/suite/<profile>)")
    add("--recipes", default=None, help="comma-separated recipe names (default: every registered recipe)")
    add("--budgets", type=_budgets, default=None, help="comma-separated budgets (default: the profile's)")
    add("--seeds", type=_seeds, default=None, help="comma-separated seeds (default: the profile's)")
    add("--subset", type=_count0, default=None, help="training images (default: the profile's)")
    add("--epochs", type=_count, default=None, help="training epochs (default: the profile's)")
    add("--device", default=None, help="cpu / cuda (default: the profile's)")
    add("--threads", type=_count, default=None, help="CPU threads of the latency timing (default: the profile's)")
    add("--keep-checkpoints", default=None, metavar="DIR", help="keep each job's checkpoint in DIR")
    add("--retry-errors", action="store_true", help="rerun the jobs that failed before")
    add("--report-only", action="store_true", help="rebuild table, plots and report from <out>/runs/")
    add("--no-progress", action="store_true", help="no progress bar")


def _budgets(text: str) -> tuple[float, ...]:
    """``--budgets``: comma-separated fractions in (0, 1]; anything else is argparse's one-line usage error."""
    return _checked(
        text, lambda t: tuple(float(v) for v in t.split(",") if v.strip()),
        lambda vs: bool(vs) and all(0.0 < v <= 1.0 for v in vs), "comma-separated budgets in (0, 1] like 0.25,0.5",
    )  # fmt: skip


def _seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: comma-separated integers in [0, 2**31), the range of ``--seed``."""
    return _checked(
        text, lambda t: tuple(int(v) for v in t.split(",") if v.strip()),
        lambda vs: bool(vs) and all(0 <= v < 2**31 for v in vs), "comma-separated seeds (integers >= 0) like 0,1",
    )  # fmt: skip


def profile_from_args(args: argparse.Namespace) -> BenchProfile:
    """The named profile with the command-line overrides applied."""
    profile = PROFILES[args.profile or "quick"]
    changes: dict[str, Any] = {}
    for key, parse in (("budgets", _budgets), ("seeds", _seeds)):  # parsed by argparse, or text from a script
        value = getattr(args, key, None)
        if value:
            changes[key] = parse(value) if isinstance(value, str) else tuple(value)
    for key in ("subset", "epochs", "device", "threads"):
        if getattr(args, key, None) is not None:
            changes[key] = getattr(args, key)
    return dataclasses.replace(profile, **changes) if changes else profile


def bench_main(args: argparse.Namespace) -> int:
    """``dynnet bench --profile quick|full [...]``: run the suite (or rebuild its report) and print where it went."""
    profile = profile_from_args(args)
    out = Path(args.out or f"benchmarks/results/suite/{profile.name}")
    if getattr(args, "report_only", False):
        from dynnet.bench.latency import machine_info
        from dynnet.bench.report import load_rows, write_outputs

        write_outputs(mark_stale(load_rows(out), profile), out, profile=profile.as_dict(), machine=machine_info())
    else:
        recipes = [r.strip() for r in args.recipes.split(",")] if getattr(args, "recipes", None) else None
        run_suite(
            profile,
            out,
            recipes,
            checkpoint_dir=getattr(args, "keep_checkpoints", None),
            retry_errors=getattr(args, "retry_errors", False),
            progress=not getattr(args, "no_progress", False),
        )
    print(f"report: {out / 'report.md'}")
    return 0
