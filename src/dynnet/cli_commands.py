"""The handlers of the ``dynnet`` subcommands: each reads the parsed arguments, calls the library and prints.

Only the standard library is imported here at module level; each handler imports the part of the library it needs,
so that ``dynnet --help`` loads no torch.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynnet.cli_args import _dataset_kwargs, _progress
from dynnet.cli_runs import _claim_run_folder, _finished_run, _held_run_files, _release_run_folder

__all__ = ["COMMANDS", "FROM_SCRATCH", "QUICKSTART_FINE_TUNE", "QUICKSTART_RECIPE"]


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
    budget_ms = getattr(args, "budget_ms", None)
    out = args.out or (f"{stem}-{budget_ms:g}ms" if budget_ms is not None else f"{stem}-b{args.budget:g}")
    if checkpoint_paths(out)[0].exists() and not args.force:
        raise ValueError(f"{out} exists: pass --force to overwrite it, or another --out")
    seed = int(((meta.get("state") or {}).get("config") or {}).get("seed", 0))
    loaders = build_loaders(
        args.data, root=args.data_root, batch_size=args.batch_size, val_fraction=0.1, seed=seed,
        channels=_input_channels(meta),
    )  # fmt: skip
    bn_data = loaders.train if args.reestimate_bn else None
    if budget_ms is not None:  # measured on this machine: the latency of sparse mode at the serving batch size
        if args.reestimate_bn:
            raise ValueError("--reestimate-bn goes with --budget, not --budget-ms")
        report = dynnet.calibrate(
            model, loaders.val, budget_ms=budget_ms, latency_batch_size=getattr(args, "latency_batch_size", None)
        )
    else:
        report = dynnet.calibrate(model, loaders.val, args.budget, tolerance=args.tolerance, bn_data=bn_data)
    test = evaluate(model, loaders.test, mode="sparse")
    save_checkpoint(out, model)
    print(f"{args.checkpoint} ({model.recipe}) calibrated on the validation split of {args.data}: {report.summary()}")
    target = f"{budget_ms:g} ms → measured {report.latency_ms:.3g} ms (val)" if budget_ms is not None else (
        f"{args.budget:.2f} → achieved {report.mac_fraction:.3f} (val)"
    )  # fmt: skip
    print(f"  budget {target}; MAC fraction {test.mac_fraction:.3f} (test); test accuracy {100 * test.accuracy:.2f} %")
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


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
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
"""The handler of every subcommand (``quickstart`` is ``train`` with the main job's defaults)."""
