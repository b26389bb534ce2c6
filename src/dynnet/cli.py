"""The ``dynnet`` command: parses arguments and calls the library, nothing else.

    dynnet list [recipes|models|datasets]
    dynnet macs --model resnet50 [--input 3,224,224] [--recipe R --budget B] [--depth 2] [--batch 1]
    dynnet train --model cifar_resnet20 --recipe convnet_aig --budget 0.5 --data fashion_mnist --epochs 3 ... [--force]
                 [--max-steps N] [--checkpoint-every N] [--progress|--no-progress] [--grey-to-rgb]
    dynnet pretrain --model cifar_resnet20 --data fashion_mnist --out runs/pretrain/resnet20 [--width 0.75]
    dynnet calibrate --checkpoint runs/quickstart/checkpoint --budget 0.4 [--out runs/q-b0.4] [--force]
    dynnet eval --checkpoint runs/quickstart [--data fashion_mnist] [--mode sparse]
    dynnet bench --checkpoint runs/quickstart/checkpoint [--data fashion_mnist] [--batch-sizes 1,64]
    dynnet bench --profile quick|full [--recipes a,b] [--budgets 0.25,0.5] [--out DIR] [--report-only]
    dynnet quickstart

Errors (unknown names, bad values, missing data, corrupt checkpoints) print one ``dynnet: error: ...`` line on
stderr and exit with status 2. A reader that closes the output early (``dynnet list | head -1``) ends the command
quietly with status 1 (what Python's documentation recommends for a broken pipe).

``--checkpoint`` takes a checkpoint stem, one of its files, or a run folder (its ``checkpoint.json``). A ``train``
run folder that already holds a run is resumed when the settings are the same, and refused otherwise, unless
``--force`` (which replaces it).

Only ``argparse`` and the standard library are imported before the arguments are parsed: ``dynnet --help`` answers
without loading the models, and the library is imported by the command that needs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


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


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``dynnet: error: ...`` line (status 2), like every other error of the command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"dynnet: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser(*, suite: bool = True) -> argparse.ArgumentParser:
    """The argument parser of the ``dynnet`` command.

    Args:
        suite: give ``dynnet bench`` the benchmark suite's options (``--profile``...); they come from
            :mod:`dynnet.bench.suite`, whose import loads torchvision and the recipes (seconds), so :func:`main`
            asks for them only when the command line names ``bench``.
    """
    parser = _Parser(prog="dynnet", description="Dynamic networks: convert, train, count, time.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered recipes, models or datasets")
    p.add_argument("what", nargs="?", choices=("recipes", "models", "datasets"), help="default: all three")
    p.add_argument("--family", help="only the recipes of this family (layer_skip, early_exit, ...)")

    p = sub.add_parser("macs", help="per-module MAC table of a (converted) model")
    p.add_argument("--model", required=True, help="cifar_resnet20, resnet50, timm/<name>, ...")
    p.add_argument("--input", type=_shape, help="C,H,W (default 3,32,32 for cifar_* models, else 3,224,224)")
    p.add_argument("--recipe", help="convert with this recipe first")
    p.add_argument("--budget", type=_fraction, help="the recipe's budget")
    p.add_argument("--depth", type=_count0, default=2, help="deepest module level shown")
    p.add_argument("--batch", type=_count, default=1, help="batch size of the counted pass")
    p.add_argument("--num-classes", type=_count, default=None)

    def add_train_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="cifar_resnet20")
        p.add_argument("--width", type=_positive, default=None, help="width multiplier of cifar_resnet* models")
        p.add_argument("--recipe", default="convnet_aig", help="'none' for the static network")
        p.add_argument("--budget", type=_fraction, default=0.5)
        p.add_argument(
            "--set", dest="settings", type=_setting, action="append", default=[], metavar="KEY=VALUE",
            help="a setting of the recipe (a field of its config), e.g. --set little=zoo:KEY; repeatable",
        )  # fmt: skip
        p.add_argument("--data", default="fashion_mnist", help="registered dataset")
        p.add_argument("--data-root", default=None)
        _add_grey_to_rgb(p)
        p.add_argument("--epochs", type=_count, default=3)
        p.add_argument("--max-steps", type=_count, default=None, help="stop after this many optimiser steps")
        p.add_argument("--batch-size", type=_count, default=128)
        p.add_argument("--lr", type=_positive, default=0.1)
        p.add_argument(
            "--subset", type=_count0, default=None, help="training images; 0 = all (default: the quickstart's subset)"
        )
        p.add_argument(
            "--out", default="runs/quickstart",
            help="run folder (checkpoint, log.csv, results.json): a run there with the same settings is resumed, "
            "one with other settings refused",
        )  # fmt: skip
        p.add_argument(
            "--checkpoint-every", type=_count0, default=0, metavar="N",
            help="also checkpoint every N steps, so that a killed run resumes close to where it was (default: at "
            "each epoch end only)",
        )  # fmt: skip
        p.add_argument("--force", action="store_true", help="replace the run already in --out")
        p.add_argument(
            "--resume", action="store_true",
            help="go on with the run in --out (the same command does so anyway; --resume refuses to start a new one)",
        )  # fmt: skip
        p.add_argument("--seed", type=_seed, default=0)
        p.add_argument("--threads", type=_count, default=None)
        p.add_argument("--no-profile", action="store_true", help="skip the latency measurement")
        _add_progress(p)
        p.add_argument(
            "--init", default=None,
            help="start from trained weights: a .safetensors file, a pretrain folder, a static run's checkpoint, "
            "torchvision:NAME or timm:NAME",
        )  # fmt: skip
        p.add_argument(
            "--distill", type=_nonnegative, default=0.0, help="weight of distillation from the dense --init base"
        )
        p.add_argument(
            "--decision-lr-scale", type=_positive, default=None,
            help="learning-rate multiplier of the gates/heads when fine-tuning from --init (default: the recipe's)",
        )  # fmt: skip

    p = sub.add_parser("pretrain", help="train a dense base network with a real schedule (safetensors + manifest)")
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--width", type=_positive, default=None, help="width multiplier of cifar_resnet* models")
    p.add_argument("--data", default="fashion_mnist", help="registered dataset")
    p.add_argument("--data-root", default=None)
    _add_grey_to_rgb(p)
    p.add_argument("--epochs", type=_count, default=30)
    p.add_argument("--lr", type=_positive, default=0.1)
    p.add_argument("--batch-size", type=_count, default=128)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--threads", type=_count, default=None)
    p.add_argument("--out", required=True, help="run folder (resumable; model.safetensors + manifest.json at the end)")
    _add_progress(p)

    p = sub.add_parser("prune", help="static baseline: a trained base with its lowest-L1 channels removed, fine-tuned")
    p.add_argument("--init", required=True, help="the trained base: zoo:KEY, a .safetensors file or pretrain folder")
    p.add_argument("--macs", type=_fraction, required=True, help="MAC fraction of the pruned network (0, 1]")
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--data", default="fashion_mnist", help="registered dataset")
    p.add_argument("--data-root", default=None)
    _add_grey_to_rgb(p)
    p.add_argument(
        "--epochs", type=_count, default=3, help="fine-tuning epochs (the dynamic recipes' fine-tune schedule)"
    )
    p.add_argument("--lr", type=_positive, default=0.01)
    p.add_argument("--distill", type=_nonnegative, default=0.0, help="weight of distillation from the unpruned base")
    p.add_argument("--batch-size", type=_count, default=128)
    p.add_argument("--subset", type=_count0, default=0, help="training images; 0 = all")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--threads", type=_count, default=None)
    p.add_argument("--out", required=True, help="run folder (model.safetensors + manifest.json; never overwritten)")
    _add_progress(p)

    add_train_args(sub.add_parser("train", help="train, test (sparse) and time a recipe"))
    p = sub.add_parser(
        "quickstart",
        help="the main job: network selection (the shipped ResNet-20 of width 0.5, then the shipped ResNet-20 on the "
        "images it is unsure of) fine-tuned at budget 0.5 on Fashion-MNIST, beside the shipped static networks",
    )
    add_train_args(p)
    # Fine-tuning from the shipped base when there is one (QUICKSTART_FINE_TUNE), else dynnet train's defaults.
    # Network selection, not FBS or ConvNet-AIG: under this schedule it reached 94.26 % at 50 % of the MACs (above
    # the dense base), FBS 93.49 %, ConvNet-AIG 63.7 % -- docs/training.md.
    p.set_defaults(init="auto", epochs=None, lr=None, distill=None, recipe=QUICKSTART_RECIPE)

    p = sub.add_parser("calibrate", help="set a checkpoint's decision thresholds so that it spends a budget")
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint stem or its .json/.safetensors file")
    p.add_argument("--budget", type=_fraction, required=True, help="target mean fraction of the dense MACs per image")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--tolerance", type=_open_fraction, default=0.01)
    p.add_argument("--out", default=None, help="where the calibrated checkpoint goes (default: <checkpoint>-b<budget>)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--batch-size", type=_count, default=256)
    p.add_argument("--threads", type=_count, default=None)

    for name, text in (
        ("eval", "test accuracy and MACs of a checkpoint"),
        ("bench", "dense vs sparse latency of a checkpoint, or the benchmark suite (--profile quick|full)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "--checkpoint", required=name == "eval", help="run folder, checkpoint stem or its .json/.safetensors file"
        )
        p.add_argument("--data", default="fashion_mnist")
        p.add_argument("--data-root", default=None)
        p.add_argument("--batch-size", type=_count, default=128)
        p.add_argument("--threads", type=_count, default=None)
        if name == "eval":
            p.add_argument("--mode", default="sparse", choices=("sparse", "masked", "dense"))
            p.add_argument("--max-batches", type=_count, default=None)
        else:
            p.add_argument("--batch-sizes", type=_ints, default=(1, 64))
            p.add_argument("--min-run-time", type=_positive, default=1.0)
            if suite:
                from dynnet.bench.suite import add_suite_arguments

                add_suite_arguments(p)  # --profile, --out, --recipes, --budgets, ... (keeps the --threads above)
    return parser


def _list(args: argparse.Namespace) -> None:
    import dynnet
    from dynnet.data import DATASETS

    what = [args.what] if args.what else ["recipes", "models", "datasets"]
    for kind in what:
        if kind == "recipes":
            from dynnet.core import RECIPES

            names = dynnet.list_recipes(args.family)
            rows = [f"{n:<24} {RECIPES.get(n).family:<14} {RECIPES.get(n).paper}" for n in names]
        elif kind == "models":
            rows = [*dynnet.list_models(), "(any torchvision model name)", "(timm/<name> with timm installed)"]
        else:
            rows = DATASETS.names()
        if len(what) > 1:
            print(f"{kind}:")
        print("\n".join(("  " if len(what) > 1 else "") + r for r in rows))


def _macs(args: argparse.Namespace) -> None:
    import torch

    import dynnet

    shape = args.input or ((3, 32, 32) if args.model.startswith("cifar_") else (3, 224, 224))
    # Every builder takes in_channels (timm as in_chans; torchvision refuses anything but 3 in one line), so a
    # wrong --input is refused here rather than deep inside the first convolution.
    kwargs: dict[str, Any] = {"in_channels": shape[0]}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    model = dynnet.create_model(args.model, args.recipe, budget=args.budget, **kwargs).eval()
    if args.recipe is not None:
        dynnet.set_mode(model, "sparse")
    x = torch.randn((args.batch, *shape), generator=torch.Generator().manual_seed(0))
    report = dynnet.count_macs(model, x)
    print(f"{args.model}{' + ' + args.recipe if args.recipe else ''} at {args.batch}x{'x'.join(map(str, shape))}")
    # A converted model wraps the network as ``net``: one level deeper shows the same modules.
    print(report.table(args.depth + (1 if args.recipe else 0)))
    print(f"per sample: {report.mean:,.0f} MACs (dense {report.dense:,.0f}, fraction {report.fraction:.3f})")
    if report.uncounted:
        print(f"ops without a counting rule: {', '.join(sorted(report.uncounted))}")


QUICKSTART_RECIPE = "network_selection"
"""The main job's recipe (the strongest of those tried under its schedule; see docs/training.md). Its little network
is the shipped ResNet-20 of half the width when the package has one (``_train``)."""
QUICKSTART_FINE_TUNE = {"epochs": 1, "lr": 0.02, "distill": 1.0}
"""The main job's fine-tuning from the shipped base: one epoch of the default subset, distilled from the base."""
FROM_SCRATCH = {"epochs": 3, "lr": 0.1, "distill": 0.0}
"""``dynnet train``'s schedule without trained weights."""


def _train(args: argparse.Namespace) -> None:
    import dynnet
    from dynnet.bench.experiment import DEFAULT_SUBSET, run_experiment
    from dynnet.data import DATASETS
    from dynnet.models import check_model_name

    if args.subset is None:
        args.subset = DEFAULT_SUBSET
    recipe = None if args.recipe in (None, "none") else args.recipe
    # Names first, before the run folder is touched and the data loaded: a typo is answered at once.
    dynnet.list_models()  # the method packages register their own base models (msdnet_tiny)
    check_model_name(args.model)
    DATASETS.get(args.data)
    recipe_settings = dict(args.settings)
    if recipe_settings and recipe is None:
        raise ValueError("--set gives settings of a recipe: give --recipe too")
    compare, missing = False, None
    if args.init == "auto":  # quickstart: the shipped base of the model on this data, when there is one
        from dynnet import zoo

        key = zoo.weights_key(args.model, args.data, args.width)
        compare = key in zoo.shipped()
        args.init, missing = (f"zoo:{key}", None) if compare else (None, key)
        little = zoo.weights_key(args.model, args.data, 0.5 * (args.width or 1.0))
        if recipe == "network_selection" and "little" not in recipe_settings and little in zoo.shipped():
            recipe_settings["little"] = f"zoo:{little}"  # the shipped half-width network, trained like the base
    elif args.init and not args.init.startswith(("zoo:", "torchvision:", "timm:")):
        from dynnet.train.init import resolve_init

        resolve_init(args.init)  # a path without weights is refused before the run folder is touched
    if args.decision_lr_scale is not None and (not args.init or not recipe):
        raise ValueError("--decision-lr-scale applies to a recipe fine-tuned from --init: give both")
    # quickstart leaves its schedule unset: the fine-tuning one from trained weights, else dynnet train's.
    for name, value in (QUICKSTART_FINE_TUNE if args.init else FROM_SCRATCH).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if missing is not None:
        print(f"dynnet: no shipped base {missing!r}: training from scratch for {args.epochs} epoch(s)")
    settings: dict[str, Any] = {
        "model": args.model,
        "recipe": recipe,
        "budget": args.budget if recipe else None,
        "dataset": args.data,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "subset": args.subset or None,
        "seed": args.seed,
        "model_kwargs": {**({"width": args.width} if args.width else {}), **recipe_settings},
        "init": args.init,
        "distill": args.distill if args.init else 0.0,
        "max_steps": args.max_steps,
        "grey_to_rgb": args.grey_to_rgb,
    }  # fmt: skip (--checkpoint-every is not a setting: a killed run resumes with another interval)
    overrides: dict[str, Any] = {}
    if args.decision_lr_scale is not None:
        overrides["decision_lr_scale"] = settings["decision_lr_scale"] = args.decision_lr_scale
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    if args.checkpoint_every:
        overrides["checkpoint_every_steps"] = args.checkpoint_every
    out = Path(args.out) if args.out else None
    if args.resume and (args.force or out is None or not _held_run_files(out)):
        why = "--resume and --force contradict each other" if args.force else f"{out} holds no run to resume"
        raise ValueError(f"{why}: drop --resume to start a new run")
    state, created = _claim_run_folder(out, settings, force=args.force) if out else ("new", [])
    if state == "finished":
        print(_finished_run(out))
        return
    try:
        result = run_experiment(
            model=args.model, recipe=recipe, budget=settings["budget"], dataset=args.data, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, subset=settings["subset"], out_dir=args.out, seed=args.seed,
            data_root=args.data_root, threads=args.threads, profile=not args.no_profile, progress=_progress(args),
            model_kwargs=settings["model_kwargs"] or None, init=args.init, distill=settings["distill"],
            compare_static=compare, train_overrides={**overrides, **({"resume": True} if state == "resume" else {})},
            dataset_kwargs=_dataset_kwargs(args) or None,
        )  # fmt: skip
    except BaseException:
        if out is not None and state == "new":
            _release_run_folder(out, created)
        raise
    print(result.summary())
    if args.out:
        print(f"  written                 {args.out}/results.json, log.csv, checkpoint.json + .safetensors")


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


def _pretrain(args: argparse.Namespace) -> None:
    from dynnet.train.pretrain import pretrain

    m = pretrain(
        args.model, args.data, out_dir=args.out, width=args.width, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, seed=args.seed, threads=args.threads, data_root=args.data_root,
        progress=_progress(args), dataset_kwargs=_dataset_kwargs(args) or None,
    )  # fmt: skip
    print(
        f"dynnet: pretrained {m['model']} on {m['data']}: test accuracy {100 * m['test_accuracy']:.2f} % "
        f"({m['test_images']} images), {m['dense_macs'] / 1e6:.2f} M MACs"
    )
    print(f"  written {args.out}/model.safetensors (sha256 {m['sha256'][:16]}...), manifest.json")


def _prune(args: argparse.Namespace) -> None:
    from dynnet.train.prune import prune

    m = prune(
        args.init, args.macs, out_dir=args.out, model=args.model, data=args.data, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, seed=args.seed, subset=args.subset or None, threads=args.threads,
        data_root=args.data_root, progress=_progress(args), distill=args.distill,
        dataset_kwargs=_dataset_kwargs(args) or None,
    )  # fmt: skip
    p = m["pruned"]
    print(
        f"dynnet: pruned {m['model']} to {p['mac_fraction']:.3f} of its MACs ({m['macs'] / 1e6:.2f} M): test accuracy "
        f"{100 * m['test_accuracy']:.2f} % after fine-tuning ({100 * p['accuracy_before_fine_tuning']:.2f} % before)"
    )
    print(f"  written {args.out}/model.safetensors (sha256 {m['sha256'][:16]}...), manifest.json")


def _calibrate(args: argparse.Namespace) -> None:
    import torch

    import dynnet
    from dynnet.data import build_loaders
    from dynnet.train import evaluate, load_checkpoint, save_checkpoint
    from dynnet.train.checkpoint import checkpoint_paths

    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.checkpoint)
    if not isinstance(model, dynnet.DynamicModel):
        raise ValueError(f"{args.checkpoint} holds a static network: there is nothing to calibrate")
    stem = checkpoint_paths(args.checkpoint)[0].with_suffix("")
    out = args.out or f"{stem}-b{args.budget:g}"
    if checkpoint_paths(out)[0].exists() and not args.force:
        raise ValueError(f"{out} exists: pass --force to overwrite it, or another --out")
    seed = int(((meta.get("state") or {}).get("config") or {}).get("seed", 0))
    loaders = build_loaders(
        args.data, root=args.data_root, batch_size=args.batch_size, val_fraction=0.1, seed=seed,
        channels=_input_channels(meta),
    )  # fmt: skip
    report = dynnet.calibrate(model, loaders.val, args.budget, tolerance=args.tolerance)
    test = evaluate(model, loaders.test, mode="sparse")
    save_checkpoint(out, model)
    print(f"{args.checkpoint} ({model.recipe}) calibrated on the validation split of {args.data}: {report.summary()}")
    print(
        f"  budget {args.budget:.2f} → achieved {report.mac_fraction:.3f} (val) / {test.mac_fraction:.3f} (test); "
        f"test accuracy {100 * test.accuracy:.2f} %"
    )
    print(f"  written {out}.json + .safetensors")


def _load(args: argparse.Namespace):
    import torch

    from dynnet.data import build_loaders
    from dynnet.train import load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.checkpoint)
    loaders = build_loaders(
        args.data, root=args.data_root, batch_size=args.batch_size, val_fraction=0.0, channels=_input_channels(meta)
    )
    return model, meta, loaders


def _input_channels(meta: dict[str, Any]) -> int | None:
    """The input channels of a checkpoint's network, when its build record says (a network trained on grey images
    repeated to RGB, ``--grey-to-rgb``, is tested on them repeated the same way)."""
    channels = ((meta.get("build") or {}).get("kwargs") or {}).get("in_channels")
    return channels if isinstance(channels, int) and not isinstance(channels, bool) and channels > 0 else None


def _eval(args: argparse.Namespace) -> None:
    from dynnet.train import evaluate

    model, meta, loaders = _load(args)
    result = evaluate(model, loaders.test, mode=args.mode, max_batches=args.max_batches)
    s = result.summary()
    print(f"{args.checkpoint} ({meta.get('recipe') or 'static'}) on {args.data} test, {args.mode} mode:")
    print(f"  accuracy {100 * s['accuracy']:.2f} %  loss {s['loss']:.4f}  images {s['num_samples']}")
    print(f"  MACs/image {s['mean_macs']:,.0f} ({100 * s['mac_fraction']:.1f} % of dense {s['dense_macs']:,.0f}); ")
    print(f"  executed {s['mean_executed_macs']:,.0f}")
    budget = getattr(model, "budget", None)
    if budget is not None:
        cal = model.calibrated_budget
        target = budget if cal is None else cal
        how = "calibrated" if cal is not None else "not calibrated"
        print(f"  budget {target:.2f} → achieved {s['mac_fraction']:.3f} (test, {args.mode}; {how})")


def _bench(args: argparse.Namespace) -> None:
    import torch

    from dynnet.bench.harness import profile_model

    if args.profile is not None:
        from dynnet.bench.suite import bench_main

        bench_main(args)
        return
    if args.checkpoint is None:
        raise ValueError("dynnet bench needs --checkpoint (one model) or --profile quick|full (the benchmark suite)")
    model, _, loaders = _load(args)
    need = max(max(args.batch_sizes), 32)
    xs, got = [], 0
    for x, _ in loaders.test:
        xs.append(x)
        got += x.shape[0]
        if got >= need:
            break
    row = profile_model(
        model, torch.cat(xs), batch_sizes=args.batch_sizes, threads=args.threads, min_run_time=args.min_run_time
    )
    print(json.dumps(row, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dynnet`` command; returns the exit status (0 ok, 2 usage or input error, 1 output closed early)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(suite="bench" in argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed "dynnet: error: ..." (or the help)
        return int(exit_.code or 0)
    from dynnet.core import UnknownNameError
    from dynnet.data import DatasetNotFoundError

    if args.command in TRAINING_COMMANDS:
        # The command is an application: show the loop's epoch lines and gate-health warnings.
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handlers = {
        "list": _list,
        "macs": _macs,
        "train": _train,
        "quickstart": _train,
        "pretrain": _pretrain,
        "prune": _prune,
        "calibrate": _calibrate,
        "eval": _eval,
        "bench": _bench,
    }
    try:
        handlers[args.command](args)
        sys.stdout.flush()  # here, not at exit: a closed pipe must surface as the BrokenPipeError handled below
    except KeyboardInterrupt:  # Ctrl-C: one line, what was kept, and how to go on; no traceback
        print(f"dynnet: interrupted{_kept_on_interrupt(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`dynnet list | head -1`): stop quietly. Point stdout at /dev/null so that the
        # interpreter's final flush does not report the same error again.
        _silence_stdout()
        return 1
    except (UnknownNameError, DatasetNotFoundError, ValueError, TypeError, ImportError, OSError) as err:
        # ValueError covers CheckpointError and bad budgets; TypeError unknown recipe settings; OSError files that
        # cannot be read or written (permissions, a full disk).
        message = " ".join(str(err).split())
        print(f"dynnet: error: {message}", file=sys.stderr)
        return 2
    return 0


TRAINING_COMMANDS = ("train", "quickstart", "pretrain", "prune")
"""The commands that train (INFO logging on; an interrupted one says where its checkpoint is)."""


def _kept_on_interrupt(args: argparse.Namespace) -> str:
    """What an interrupted command leaves for the user, as the end of the "interrupted" line ('' when nothing)."""
    if args.command == "bench" and getattr(args, "profile", None):
        return "; the finished jobs are kept: the same command goes on with the others"
    out = getattr(args, "out", None)
    if args.command in TRAINING_COMMANDS and out and (Path(out) / "checkpoint.json").is_file():
        return f"; the last checkpoint is in {out}: the same command resumes from it"
    return ""


def _silence_stdout() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (tests capture into StringIO)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
