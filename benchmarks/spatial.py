"""Spatial and block recipes on Cluttered Fashion-MNIST (64×64): accuracy vs MACs vs static baselines, and
the realized speedup of sparse execution on CPU (batch 1, 16 and 64).

Protocol (short, CPU-only, shared machine):

1. the base network ``cifar_resnet20`` (width ``--width``) is trained for ``--base-epochs`` on a subset of
   the training canvases; static baselines of reduced width / depth get the same schedule;
2. each dynamic recipe converts a copy of the trained base (gates open) and is fine-tuned for
   ``--tune-epochs`` with its own objective (the DynConv and SACT papers also start from a trained ResNet);
   the static base is fine-tuned for as long, so that every model sees the same number of steps.
   PerforatedCNNs (input-independent masks) run at several keep rates: impact masks (the paper's best kind,
   :func:`~dynnet.methods.spatial.perforated_cnn.impact_masks_`, 3 removal rounds on ``--impact-batches`` training
   batches of the trained base, then the fine-tune) at 0.3 / 0.5 / 0.7 and a data-free grid mask at 0.5;
3. every model is evaluated on ``--test`` real test canvases in sparse mode (accuracy, theoretical and
   executed MACs per image), and timed dense vs sparse at batch 1, 16 (the spatial kernels' target batch)
   and 64 with :func:`dynnet.bench.harness.profile_model` (realized speedup ratio = latency speedup ÷ MAC
   speedup, ``b{B}_realized_ratio``).

Results: ``<out>/results.json`` (+ ``results.csv``, ``accuracy_vs_macs.png``; ``<out>`` defaults to
``benchmarks/results/spatial``), with :func:`dynnet.bench.machine_info` at the start and the end (date, load
average, torch threads: latencies under load are noisy).

Usage::

    python benchmarks/spatial.py                  # defaults below
    python benchmarks/spatial.py --profile-only   # re-time the saved models
    python benchmarks/spatial.py --quick --threads 1 --out /tmp/bench_check/spatial   # smoke test

Default schedule and time estimate (quiet 2-core CPU, 2 threads; from the CPU time of a few timed training steps
of every model at 1 thread, scaled by ResNet-20's measured ~800 training images/s at 2 threads, 64×64 canvases):
8,000 training canvases (validation held out apart), batch 128; base ResNet-20 ×0.5 2 epochs + 1 (~75 s); static
ResNet-20 ×0.35 and ResNet-8 ×0.5 3 epochs each (~100 s together); 7 dynamic models fine-tuned 1 epoch each
(dynconv ~42 s, sbnet ~36 s, sact ~35 s, 4 × perforated_cnn ~43 s: ~290 s; the 3 impact masks ~8 s each);
sparse test on 2,000 canvases and timing at 3 batch sizes × 0.5 s per configuration for 10 models (~100 s):
**about 10.5 minutes** in all (≤ 12 min). DynConv and SBNet masks start at logit ``--gate-bias`` 2.0
(p ≈ 0.88) rather than the saturated open 6: one epoch cannot close saturated gates (the earlier results,
8 steps under load, kept every position). In a probe of this fine-tune (1 epoch of 8,000 canvases from a barely
trained base, 1 thread) DynConv reached a MAC fraction of 0.35 and SACT 1.03 at ponder weight 0.01 but 0.89 at
0.1, hence ``--sact-ponder-weight`` 0.1.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from pathlib import Path

import torch

import dynnet
from dynnet.bench import machine_info, steady_malloc
from dynnet.bench.harness import profile_model
from dynnet.blocks import calibrate_dense_fallback_
from dynnet.data import build_loaders
from dynnet.methods.spatial.dynconv import DynConvAnnealing
from dynnet.methods.spatial.perforated_cnn import impact_masks_
from dynnet.train import TrainConfig, evaluate, fit

# label -> (recipe, conversion settings, impact-mask keep rate or None)
RECIPES: dict[str, tuple[str, dict, float | None]] = {
    "dynconv": ("dynconv", {"budget": 0.5}, None),
    "sbnet": ("sbnet", {"budget": 0.5, "tile": 8}, None),
    "sact": ("sact", {"ponder_weight": 0.1}, None),  # --sact-ponder-weight
    "perforated_cnn_impact0.3": ("perforated_cnn", {"input_size": 64}, 0.3),
    "perforated_cnn_impact0.5": ("perforated_cnn", {"input_size": 64}, 0.5),
    "perforated_cnn_impact0.7": ("perforated_cnn", {"input_size": 64}, 0.7),
    "perforated_cnn_grid0.5": ("perforated_cnn", {"budget": 0.5, "mask": "grid", "input_size": 64}, None),
}
BATCH_SIZES = (1, 16, 64)


def _convert(pretrained: torch.nn.Module, label: str) -> torch.nn.Module:
    recipe, kwargs, _ = RECIPES[label]
    return dynnet.convert(copy.deepcopy(pretrained), recipe, **kwargs)


def _test_batches(loaders, n_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in loaders.test:
        xs.append(x)
        ys.append(y)
        if sum(len(v) for v in ys) >= n_test:
            break
    return torch.cat(xs)[:n_test], torch.cat(ys)[:n_test]


def _evaluate(model, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> dict:
    loader = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]
    ev = evaluate(model, loader, mode="sparse")
    return {
        "accuracy": ev.accuracy,
        "mean_macs": float(ev.macs.mean()),
        "mean_executed_macs": float(ev.executed.mean()),
        "dense_macs": ev.dense_macs,
        "mac_fraction": ev.mac_fraction,
    }


def _profile(model, x_test: torch.Tensor, args) -> dict:
    return profile_model(
        model,
        x_test[:64],
        batch_sizes=BATCH_SIZES,
        threads=args.threads,
        min_run_time=args.min_run,
        batch1_samples=args.batch1_samples,
    )


def main() -> None:
    steady_malloc()  # no page faults from glibc returning memory between timed calls (bench.latency.STEADY_MALLOC)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/spatial")
    parser.add_argument("--subset", type=int, default=8000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--base-epochs", type=int, default=2)
    parser.add_argument("--tune-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run", type=float, default=0.5)
    parser.add_argument("--batch1-samples", type=int, default=16)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--profile-only", action="store_true")
    parser.add_argument(
        "--dense-fallback",
        action="store_true",
        help="calibrate each block's dense fallback (dynnet.blocks.calibrate_dense_fallback_) before timing",
    )
    parser.add_argument("--reuse-base", action="store_true", help="start from models/base_pretrained.pt if present")
    parser.add_argument("--tune-steps", type=int, default=None, help="cap the fine-tuning steps (max_steps)")
    parser.add_argument("--skip", nargs="*", default=[], help="static baselines to leave out")
    parser.add_argument(
        "--gate-bias",
        type=float,
        default=2.0,
        help="initial logit of the dynconv/sbnet mask units (the recipes' own start: open, 6); a short fine-tune "
        "cannot close gates that start saturated",
    )
    parser.add_argument("--impact-batches", type=int, default=2, help="batches of 128 for the impact masks")
    parser.add_argument("--sact-ponder-weight", type=float, default=0.1, help="SACT's ponder cost weight")
    parser.add_argument("--quick", action="store_true", help="smoke test: 256 canvases, 2 steps, short timing")
    args = parser.parse_args()
    RECIPES["sact"][1]["ponder_weight"] = args.sact_ponder_weight
    if args.quick:
        args.subset, args.test, args.base_epochs, args.tune_epochs, args.tune_steps = 256, 64, 1, 1, 2
        args.min_run, args.batch1_samples = 0.02, 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt = out / "models"
    ckpt.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    loaders = build_loaders("cluttered_fashion_mnist", batch_size=128, subset=args.subset, val_fraction=0.02, seed=0)
    x_test, y_test = _test_batches(loaders, args.test)

    def base(name: str = "cifar_resnet20", **kw):
        torch.manual_seed(0)
        return dynnet.create_model(name, in_channels=1, num_classes=10, **kw)

    static = {
        f"static_resnet20_w{args.width}": ("cifar_resnet20", args.width),
        f"static_resnet20_w{round(args.width * 0.7, 2)}": ("cifar_resnet20", round(args.width * 0.7, 2)),
        f"static_resnet8_w{args.width}": ("cifar_resnet8", args.width),
    }
    static = {k: v for k, v in static.items() if k not in args.skip}
    base_name = f"static_resnet20_w{args.width}"
    tune = TrainConfig(epochs=args.tune_epochs, lr=0.02, max_steps=args.tune_steps)
    total_epochs = args.base_epochs + args.tune_epochs
    timings: dict[str, float] = {}
    if not args.profile_only:
        # The base, trained for base-epochs (the starting point of every recipe), then for tune-epochs more.
        for name, (arch, w) in static.items():
            model = base(arch, width=w)
            t0 = time.time()
            if name == base_name:
                if args.reuse_base and (ckpt / "base_pretrained.pt").exists():
                    model.load_state_dict(torch.load(ckpt / "base_pretrained.pt"))
                else:
                    fit(model, loaders.train, TrainConfig(epochs=args.base_epochs, lr=0.1, warmup_epochs=0.2))
                    torch.save(model.state_dict(), ckpt / "base_pretrained.pt")
                fit(model, loaders.train, tune)
            else:
                fit(model, loaders.train, TrainConfig(epochs=total_epochs, lr=0.1, warmup_epochs=0.2))
            timings[name] = time.time() - t0
            torch.save(model.state_dict(), ckpt / f"{name}.pt")
            print(name, f"{timings[name]:.0f}s", flush=True)
        for recipe in args.recipes:
            pretrained = base(width=args.width)
            pretrained.load_state_dict(torch.load(ckpt / "base_pretrained.pt"))
            model = _convert(pretrained, recipe)
            kind, impact_keep = RECIPES[recipe][0], RECIPES[recipe][2]
            if args.gate_bias is not None and kind in ("dynconv", "sbnet"):
                with torch.no_grad():
                    for _, block in model.blocks():
                        block.gate.conv.bias.fill_(args.gate_bias)
            t0 = time.time()
            if impact_keep is not None:  # masks from the trained base's loss, then the fine-tune (the paper's order)
                batches = [b for _, b in zip(range(args.impact_batches), loaders.train, strict=False)]
                impact_masks_(model, batches, impact_keep, rounds=3)
            hooks = (DynConvAnnealing(),) if kind == "dynconv" else ()
            fit(model, loaders.train, tune, hooks=hooks)
            timings[recipe] = time.time() - t0
            torch.save(model.state_dict(), ckpt / f"{recipe}.pt")
            print(recipe, f"{timings[recipe]:.0f}s", flush=True)

    rows = []
    for name, (arch, w) in static.items():
        model = base(arch, width=w)
        model.load_state_dict(torch.load(ckpt / f"{name}.pt"))
        row = {"model": name, "kind": "static", **_evaluate(model, x_test, y_test)}
        row.update(_profile(model, x_test, args))
        rows.append(row)
        print(row, flush=True)
    for recipe in args.recipes:
        model = _convert(base(width=args.width), recipe)
        model.load_state_dict(torch.load(ckpt / f"{recipe}.pt"))  # perforation masks are buffers: loaded too
        row = {"model": recipe, "recipe": RECIPES[recipe][0], "kind": "dynamic", **_evaluate(model, x_test, y_test)}
        if args.dense_fallback:  # per block: the gather kernels only where they measured faster than dense
            row["dense_fallback"] = calibrate_dense_fallback_(model, x_test[:16], min_run_time=args.min_run / 5)
        row.update(_profile(model, x_test, args))
        rows.append(row)
        print(row, flush=True)

    result = {
        "machine": info,
        "machine_after": machine_info(),
        "args": vars(args),
        "train_seconds": timings,
        "note": "see the load averages of machine / machine_after: latencies under load are noisy.",
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    with open(out / "results.csv", "w", newline="") as f:
        keys = sorted({k for r in rows for k in r})
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, out / "accuracy_vs_macs.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        marker = "s" if r["kind"] == "static" else "o"
        ax.scatter(r["mean_macs"] / 1e6, 100 * r["accuracy"], marker=marker)
        ax.annotate(r["model"], (r["mean_macs"] / 1e6, 100 * r["accuracy"]), fontsize=7)
    ax.set(xlabel="MACs per image (M, theoretical)", ylabel="top-1 accuracy (%)",
           title="Cluttered Fashion-MNIST 64×64 (test subset)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
