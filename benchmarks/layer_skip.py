"""Layer-skip and recursion recipes on Fashion-MNIST (CIFAR ResNet-20): accuracy, MACs, dense vs sparse latency.

1. Trains the static base network ``cifar_resnet20`` (1 input channel) on a subset of Fashion-MNIST (cached).
2. For every recipe: converts a copy of the trained base, fine-tunes it for a short schedule with the recipe's
   own objective (:func:`dynnet.train.fit`; SkipNet: supervised soft-gate phase then REINFORCE; BlockDrop: the
   curriculum over blocks), evaluates it in sparse mode on real test images (:func:`dynnet.train.evaluate`) and
   times dense vs sparse execution at batch 1 and 64 on real test images
   (:func:`dynnet.bench.harness.profile_model`; realized speedup ÷ MAC speedup per batch size).
3. Writes ``<out>/<recipe>.json`` (settings, test metrics, profile row, training history with gate health,
   machine info with load average and threads), ``machine.json`` (machine before/after, arguments),
   ``results.csv`` (one row per recipe) and ``layer_skip.png``; ``<out>`` is ``benchmarks/results/layer_skip``
   unless ``--out`` says otherwise.

    .venv/bin/python benchmarks/layer_skip.py [--recipes skipnet blockdrop ...] [--subset 10000] [--threads 2]
    .venv/bin/python benchmarks/layer_skip.py --quick --threads 1 --out /tmp/bench_check/layer_skip  # smoke test

Default schedule and time estimate (quiet 2-core CPU, 2 threads; estimated from the CPU time of a few timed
training steps of every recipe at 1 thread, scaled by ResNet-20's measured ~800 training images/s at 2 threads):
base network 20,000 images × 2 epochs (~50 s, cached in ``--base-cache`` for later runs); per recipe a fine-tune
of 10,000 images × 2 epochs (~156 SGD steps; ~25 s, dynamic_recursive ~60 s, ~290 s for the nine recipes),
sparse test on 5,120 images (``--test-batches 40``, ~4 s each) and timing (~4 s each): **about 7 minutes** in
all (≤ 10 min). The earlier results (1,536 images, 1 epoch, under load ≈ 20) left most gates open. A probe of
this schedule (from a weaker base, 1 thread) gave ConvNet-AIG a test MAC fraction of 0.80 at lr 0.05 (0.94 at
lr 0.02, hence the default 0.05); SkipNet's gates still all ran at test (MAC fraction 1.0, training fraction
0.73): its deterministic ``p > 0.5`` rule needs a longer REINFORCE phase.

The load average and the threads are stored with every result; timings under load are noisy.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

import dynnet
from dynnet.bench.harness import profile_model
from dynnet.bench.latency import machine_info
from dynnet.core import RECIPES as RECIPES_REGISTRY
from dynnet.data import build_loaders
from dynnet.train import FitState, Hook, TrainConfig, evaluate, fit

OUT = Path(__file__).resolve().parent / "results" / "layer_skip"

# Per recipe: conversion settings and fine-tuning settings (short schedule; lr for a fine-tune of a trained base).
RECIPES: dict[str, dict[str, Any]] = {
    "skipnet": {"convert": {"budget": 0.5, "alpha": 1.0}, "train": {}},
    "blockdrop": {"convert": {"penalty": 2.0}, "train": {}},
    "convnet_aig": {"convert": {"budget": 0.5}, "train": {"tau_start": 1.0, "tau_end": 0.5}},
    "energynet": {"convert": {"budget": 0.5}, "train": {"tau_start": 1.0, "tau_end": 0.5}},
    "dynamic_multipath": {"convert": {"budget": 0.5}, "train": {"tau_start": 1.0, "tau_end": 0.5}},
    "dual_dynamic_inference": {
        "convert": {"budget": 0.6, "resource_budget": 0.6},
        "train": {"tau_start": 1.0, "tau_end": 0.5},
    },
    "act": {"convert": {"ponder_weight": 0.05}, "train": {}},
    "iamnn": {"convert": {"ponder_weight": 0.05}, "train": {}},
    "dynamic_recursive": {"convert": {"budget": 1.0}, "train": {"tau_start": 1.0, "tau_end": 0.5}},
}


class Curriculum(Hook):
    """BlockDrop's curriculum: the policy decides the last ``k`` blocks, ``k`` growing linearly to all blocks."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks

    def on_step_end(self, state: FitState) -> None:
        frac = (state.step + 1) / max(state.total_steps, 1)
        state.model.curriculum = min(self.blocks, 1 + int(frac * 1.5 * self.blocks))


def soften_gates(model: torch.nn.Module, factor: float) -> int:
    """Scale the bias of every decision-making output layer by ``factor`` (the bias trick's logit 6 → 6·factor).

    The recipes start with saturated open gates (p ≈ 0.9975) so that a conversion reproduces the base network;
    a short fine-tune cannot move saturated gates, so the benchmark starts them at a less saturated logit
    (still open: ``6 × 0.3 = 1.8``, p ≈ 0.86). Returns how many bias tensors were scaled.
    """
    names = ("gate.fc2.bias", "gates.out.bias", "policy.net.fc.bias", "controller", "halting")
    changed = 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            last = n.endswith("fc2.bias") or n.endswith("out.bias") or n.endswith("fc.bias")
            if last and any(k in n for k in names):
                p.mul_(factor)
                changed += 1
    return changed


def train_base(loaders: Any, epochs: int, cache: Path) -> dict[str, torch.Tensor]:
    """The trained static base network's state dict (cached in ``cache``)."""
    if cache.exists():
        return torch.load(cache, weights_only=True)
    torch.manual_seed(0)
    base = dynnet.create_model("cifar_resnet20", in_channels=1, num_classes=10)
    fit(base, loaders.train, TrainConfig(epochs=epochs, lr=0.1, warmup_epochs=0.2))
    state = base.state_dict()
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, cache)
    return state


def run_recipe(name: str, base_state: dict, loaders: Any, images: torch.Tensor, args: argparse.Namespace) -> dict:
    settings = RECIPES[name]
    torch.manual_seed(0)
    base = dynnet.create_model("cifar_resnet20", in_channels=1, num_classes=10)
    base.load_state_dict(base_state)
    model = dynnet.convert(copy.deepcopy(base), name, **settings["convert"])
    softened = soften_gates(model, args.gate_scale) if args.gate_scale != 1.0 else 0
    common = {"lr": args.lr, "epochs": args.epochs, "warmup_epochs": 0.1, "seed": 0, "log_every": 20}
    started = time.perf_counter()
    history: list[dict] = []
    if name == "skipnet":  # hybrid training: supervised soft gates, then REINFORCE on hard gates
        steps = len(loaders.train) * args.epochs
        history += fit(model, loaders.train, TrainConfig(**common, max_steps=max(1, steps // 2))).history
        model.set_phase("reinforce")
        history += fit(model, loaders.train, TrainConfig(**common, max_steps=max(1, steps - steps // 2))).history
    elif name == "blockdrop":
        blocks = sum(1 for _ in model.blocks()) - 1  # minus the policy
        model.curriculum = 1
        history += fit(model, loaders.train, TrainConfig(**common), hooks=[Curriculum(blocks)]).history
        model.curriculum = None
    else:
        history += fit(model, loaders.train, TrainConfig(**common, **settings["train"])).history
    train_s = time.perf_counter() - started
    test = evaluate(model, loaders.test, mode="sparse", max_batches=args.test_batches)
    masked = evaluate(model, loaders.test, mode="masked", max_batches=2)
    n = min(masked.logits.shape[0], test.logits.shape[0])
    agree = float((masked.logits[:n].argmax(1) == test.logits[:n].argmax(1)).double().mean())
    dynnet.sparse(model)
    profile = profile_model(model, images, batch_sizes=(1, 64), threads=args.threads, min_run_time=args.min_run_time)
    result = {
        "recipe": name,
        "paper": RECIPES_REGISTRY.get(name).paper,
        "settings": {
            "convert": settings["convert"],
            "train": {**common, **settings["train"]},
            "subset": args.subset,
            "test_batches": args.test_batches,
            "gate_scale": args.gate_scale,
            "softened_biases": softened,
        },
        "test": test.summary() | {"decision_rates": test.decision_rates},
        "sparse_masked_agreement": agree,
        "profile": profile,
        "collapsed_gates": sorted({g for h in history for g in h.get("collapsed_gates", [])}),
        "history": [{k: v for k, v in h.items() if not isinstance(v, dict)} for h in history],
        "train_seconds": train_s,
        "machine": machine_info(),
    }
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def cpu_time_ms(fn: Any, x: torch.Tensor, repeats: int) -> float:
    """Median CPU time (ms, ``time.process_time``) of ``fn(x)`` over ``repeats`` calls, after one warm-up call.

    CPU time, unlike wall-clock time, hardly depends on how many other processes share the cores, so it is the
    fairer measure on a loaded machine (run with one thread: idle OpenMP threads spinning would count too).
    """
    fn(x)
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn(x)
        times.append(time.process_time() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def engine_check(names: list[str], base_state: dict, images: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    """Realized speedup of the sparse execution engine at mixed decisions, independent of training quality.

    The converted (untrained) model with the trained base weights gets random gates (``scramble_gates``), so that
    its decisions are input-dependent and mixed, and dense vs sparse execution is compared in single-thread CPU
    time at batch 1 (32 images one by one) and batch 64. Written to ``engine.json``.
    """
    from dynnet.testing import scramble_gates

    torch.set_num_threads(1)
    rows = []
    for name in names:
        torch.manual_seed(0)
        base = dynnet.create_model("cifar_resnet20", in_channels=1, num_classes=10)
        base.load_state_dict(base_state)
        model = dynnet.sparse(dynnet.convert(base, name, **RECIPES[name]["convert"]))
        scramble_gates(model, seed=args.engine_seed, scale=2.0)
        row: dict[str, Any] = {"recipe": name, "scramble_seed": args.engine_seed, "threads": 1}
        for b in (1, 64):
            x = images[:32] if b == 1 else images[:64]
            with torch.no_grad(), dynnet.trace() as t:
                model(x)
            mean_macs, dense_macs = float(t.macs().mean()), float(t.dense_macs())

            def one_by_one(inp: torch.Tensor, model: torch.nn.Module = model) -> None:
                with torch.inference_mode():
                    for i in range(inp.shape[0]):
                        model(inp[i : i + 1])

            def batch(inp: torch.Tensor, model: torch.nn.Module = model) -> None:
                with torch.inference_mode():
                    model(inp)

            fn = one_by_one if b == 1 else batch
            per = x.shape[0] if b == 1 else 1
            dense, sparse = [], []
            for _ in range(3):  # interleaved, so that both modes see the same machine state
                dynnet.set_mode(model, "dense")
                dense.append(cpu_time_ms(fn, x, args.engine_repeats) / per)
                dynnet.set_mode(model, "sparse")
                sparse.append(cpu_time_ms(fn, x, args.engine_repeats) / per)
            d, s = sorted(dense)[1], sorted(sparse)[1]
            row.update({
                f"b{b}_dense_cpu_ms": d,
                f"b{b}_sparse_cpu_ms": s,
                f"b{b}_mac_fraction": mean_macs / dense_macs,
                f"b{b}_mac_speedup": dense_macs / mean_macs,
                f"b{b}_cpu_speedup": d / s,
                f"b{b}_realized_ratio": (d / s) / (dense_macs / mean_macs),
            })  # fmt: skip
        rows.append(row)
        logging.info("engine %s: %s", name, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
        (OUT / "engine.json").write_text(json.dumps({"rows": rows, "machine": machine_info()}, indent=2))
    return rows


def _row(r: dict) -> dict:
    p, t = r["profile"], r["test"]
    return {
        "recipe": r["recipe"],
        "accuracy": round(t["accuracy"], 4),
        "mac_fraction": round(t["mac_fraction"], 4),
        "executed_fraction": round(t["mean_executed_macs"] / t["dense_macs"], 4),
        **{
            f"b{b}_{k}": round(p[f"b{b}_{k}"], 4)
            for b in (1, 64)
            for k in ("dense_ms", "sparse_ms", "mac_speedup", "latency_speedup", "realized_ratio")
        },
        "collapsed_gates": " ".join(r["collapsed_gates"]),
        "loadavg_1m": r["machine"]["loadavg_1m"],
    }


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    names = [r["recipe"] for r in rows]
    ax = axes[0]
    ax.scatter([r["mac_fraction"] for r in rows], [r["accuracy"] for r in rows])
    for r in rows:
        ax.annotate(r["recipe"], (r["mac_fraction"], r["accuracy"]), fontsize=7)
    ax.set_xlabel("mean MACs / dense MACs (test)")
    ax.set_ylabel("test accuracy (sparse)")
    ax.set_title("Fashion-MNIST, ResNet-20 base, short fine-tune")
    ax = axes[1]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["b1_realized_ratio"] for r in rows], 0.4, label="batch 1")
    ax.bar([x + 0.2 for x in xs], [r["b64_realized_ratio"] for r in rows], 0.4, label="batch 64")
    ax.axhline(0.9, color="k", lw=0.6, ls="--")
    ax.axhline(0.85, color="k", lw=0.6, ls=":")
    ax.set_xticks(list(xs), names, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("realized speedup ÷ MAC speedup")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--subset", type=int, default=10_000, help="training images of the fine-tune")
    parser.add_argument("--base-subset", type=int, default=20_000, help="training images of the base network")
    parser.add_argument("--base-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05, help="fine-tune learning rate (0.02 left gates open)")
    parser.add_argument("--test-batches", type=int, default=40, help="test batches of 128 (0: all 10,000)")
    parser.add_argument("--gate-scale", type=float, default=0.3, help="scale of the gates' open bias (soften_gates)")
    parser.add_argument("--engine", nargs="*", default=None, help="only run engine_check on these recipes")
    parser.add_argument("--engine-seed", type=int, default=3)
    parser.add_argument("--engine-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument(
        "--base-cache",
        type=Path,
        default=None,
        help="trained base network (default: /tmp/dynnet_layer_skip_base_resnet20_s{base-subset}_e{base-epochs}.pt, "
        "so that a cache of another schedule is never reused)",
    )
    parser.add_argument("--summarize", action="store_true", help="only rebuild results.csv and the plot")
    parser.add_argument("--out", type=Path, default=OUT, help="results folder")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 256+256 images, 1 epoch, 1 test batch, short timing"
    )
    args = parser.parse_args()
    _set_out(args.out)
    if args.summarize:
        summarize()
        return
    if args.quick:
        args.subset, args.base_subset, args.base_epochs, args.epochs = 256, 256, 1, 1
        args.test_batches, args.min_run_time = 1, 0.02
        args.base_cache = args.base_cache or args.out / "base_quick.pt"
    if args.base_cache is None:
        args.base_cache = Path(f"/tmp/dynnet_layer_skip_base_resnet20_s{args.base_subset}_e{args.base_epochs}.pt")
    args.test_batches = args.test_batches or None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    started = machine_info()
    (OUT / "machine.json").write_text(json.dumps({"start": started, "args": vars(args)}, indent=2, default=str))
    base_loaders = build_loaders("fashion_mnist", batch_size=128, subset=args.base_subset, val_fraction=0.1, seed=0)
    base_state = train_base(base_loaders, args.base_epochs, args.base_cache)
    loaders = build_loaders("fashion_mnist", batch_size=128, subset=args.subset, val_fraction=0.1, seed=1)
    batches = iter(loaders.test)
    images = torch.cat([next(batches)[0], next(batches)[0]])[:256]  # real test images for the timing
    if args.engine is not None:
        engine_check(args.engine or ["skipnet", "blockdrop", "convnet_aig"], base_state, images, args)
        return
    base = dynnet.create_model("cifar_resnet20", in_channels=1, num_classes=10)
    base.load_state_dict(base_state)
    base_eval = evaluate(base, loaders.test, max_batches=args.test_batches)
    (OUT / "base.json").write_text(
        json.dumps({"test_accuracy": base_eval.accuracy, "dense_macs": base_eval.dense_macs, "machine": machine_info()})
    )
    logging.info("base network: test accuracy %.4f", base_eval.accuracy)
    for name in args.recipes:
        logging.info("== %s ==", name)
        try:
            r = run_recipe(name, base_state, loaders, images, args)
        except Exception:  # keep going: one failing recipe must not lose the others' results
            logging.exception("%s failed", name)
            continue
        logging.info("%s: %s", name, _row(r))
    (OUT / "machine.json").write_text(
        json.dumps({"start": started, "end": machine_info(), "args": vars(args)}, indent=2, default=str)
    )
    summarize()


def _set_out(path: Path) -> None:
    global OUT
    OUT = Path(path)


def summarize() -> None:
    """``results.csv`` and ``layer_skip.png`` from the per-recipe JSON files present in the results folder."""
    rows = [_row(json.loads((OUT / f"{n}.json").read_text())) for n in RECIPES if (OUT / f"{n}.json").exists()]
    with (OUT / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, OUT / "layer_skip.png")


if __name__ == "__main__":
    main()
