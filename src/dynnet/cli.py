"""The ``dynnet`` command: parses arguments and calls the library, nothing else.

    dynnet list [recipes|models|datasets]
    dynnet macs --model resnet50 [--input 3,224,224] [--recipe R --budget B] [--depth 2] [--batch 1]
    dynnet train --model cifar_resnet20 --recipe convnet_aig --budget 0.5 --data fashion_mnist --epochs 3 ... [--force]
                 [--max-steps N] [--checkpoint-every N] [--progress|--no-progress] [--grey-to-rgb]
    dynnet pretrain --model cifar_resnet20 --data fashion_mnist --out runs/pretrain/resnet20 [--width 0.75]
    dynnet calibrate --checkpoint runs/quickstart/checkpoint --budget 0.4 | --budget-ms 1.5 [--out DIR] [--force]
    dynnet eval --checkpoint runs/quickstart [--data fashion_mnist] [--mode sparse]
    dynnet bench --checkpoint runs/quickstart/checkpoint [--data fashion_mnist] [--batch-sizes 1,64]
    dynnet bench --profile quick|standard|full|<family>|budget|speed_<net>|latency [--recipes a,b] [--out DIR]
    dynnet bench --profile quick --report-only          # rebuild table, plots and report from <out>/runs/
    dynnet quickstart

Errors (unknown names, bad values, missing data, corrupt checkpoints) print one ``dynnet: error: ...`` line on
stderr and exit with status 2. A reader that closes the output early (``dynnet list | head -1``) ends the command
quietly with status 1 (what Python's documentation recommends for a broken pipe).

``--checkpoint`` takes a checkpoint stem, one of its files, or a run folder (its ``checkpoint.json``). A ``train``
run folder that already holds a run is resumed when the settings are the same, and refused otherwise, unless
``--force`` (which replaces it).

Only ``argparse`` and the standard library are imported before the arguments are parsed: ``dynnet --help`` answers
without loading the models, and the library is imported by the command that needs it. This module builds the parser
and runs a command; the argument types are in :mod:`dynnet.cli_args`, the handlers in :mod:`dynnet.cli_commands`
and the run folder's rules in :mod:`dynnet.cli_runs` (all standard library at module level).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dynnet.cli_args import (
    _add_grey_to_rgb,
    _add_progress,
    _count,
    _count0,
    _fraction,
    _ints,
    _nonnegative,
    _open_fraction,
    _positive,
    _seed,
    _setting,
    _shape,
)
from dynnet.cli_commands import COMMANDS, QUICKSTART_RECIPE

__all__ = ["build_parser", "main"]


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
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--budget", type=_fraction, help="target mean fraction of the dense MACs per image")
    target.add_argument(
        "--budget-ms",
        type=_positive,
        help="target mean latency per image in ms, measured on this machine in sparse mode (within 3 %%)",
    )
    p.add_argument(
        "--latency-batch-size",
        type=_count,
        default=None,
        help="batch size --budget-ms is measured at (default: the checkpoint's latency model's, else 1)",
    )
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--tolerance", type=_open_fraction, default=0.01)
    p.add_argument(
        "--reestimate-bn",
        action="store_true",
        help="re-estimate the base network's batch-norm statistics on training images under the new decisions, "
        "then calibrate again (for a budget far from the trained one)",
    )
    p.add_argument(
        "--out", default=None, help="where the calibrated checkpoint goes (default: <checkpoint>-b<budget> or -<ms>ms)"
    )
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--batch-size", type=_count, default=256)
    p.add_argument("--threads", type=_count, default=None)

    for name, text in (
        ("eval", "test accuracy and MACs of a checkpoint"),
        ("bench", "dense vs sparse latency of a checkpoint, or the benchmark suite (--profile quick...)"),
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
    try:
        COMMANDS[args.command](args)
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
