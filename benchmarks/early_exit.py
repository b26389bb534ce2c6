"""Early-exit family on Fashion-MNIST: accuracy vs mean MACs, calibration, and realized speedup on CPU.

For every recipe: train (short schedule on a subset), collect every exit's verdict on the validation and test
splits, calibrate thresholds on validation for several MAC budgets (MSDNet's budgeted-batch protocol) and report
test accuracy and the test budget reached; cross-check one budget with a real sparse run (``evaluate``) and time
dense vs sparse inference at batch 1 and 64 (``profile_model``). Static baselines (a shallower and a thinner
ResNet trained with the same number of steps) go in the same plot.

The ResNet recipes fine-tune one pretrained ``cifar_resnet20`` (pretrain steps + fine-tune steps = the static
baselines' steps); ``msdnet`` / ``imta`` train ``msdnet_tiny`` from scratch for the same total steps.

Every result file stores :func:`dynnet.bench.machine_info` (date, load average, torch threads); ``machine.json``
holds the machine at the start and the end of the run and the arguments. Timing: dense vs sparse at batch 1 and
64 with the realized speedup ÷ MAC speedup (``b{B}_realized_ratio``), median of ``--latency-rounds`` rounds.

Usage::

    python benchmarks/early_exit.py --out benchmarks/results/early_exit
    python benchmarks/early_exit.py --quick --threads 1 --out /tmp/bench_check/early_exit   # smoke test

Default schedule and time estimate (quiet 2-core CPU, 2 threads; from the CPU time of a few timed training steps
of every model at 1 thread, scaled by ResNet-20's measured ~800 training images/s at 2 threads): batch 128,
20,000 training images; ``cifar_resnet20`` pretrained 300 steps (~50 s), every ResNet recipe fine-tuned 75 steps
(~12 s each, triple_wins ~40 s), the static baselines (full fine-tune 75 steps; ResNet-8 and ResNet-20 ×0.5 from
scratch, 375 steps each: ~50 s) and ``msdnet`` / ``imta`` from scratch (375 steps, ~80 s each); exits
collected on validation (2,400 images) and 2,048 test images, timing 2 rounds × 0.5 s per configuration
(~7 s per recipe): **about 8.5 minutes** in all (≤ 10 min). The earlier results (40 + 12 steps) were far from
trained.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from pathlib import Path

import torch

import dynnet
from dynnet.bench import machine_info
from dynnet.bench.harness import profile_model
from dynnet.data import build_loaders
from dynnet.methods.early_exit import anytime_curve, budgeted_curve, calibrate_thresholds, collect_exits
from dynnet.train import TrainConfig, evaluate, fit

RESNET_RECIPES = ("branchynet", "cdl", "adaptive_nn", "dynexit", "early_exit_cnn", "hierarchical_exits", "triple_wins")
MSD_RECIPES = ("msdnet", "imta")
BUDGETS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class _Take:
    """The first ``n`` batches of a loader, re-iterable."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self) -> int:
        return min(self.n, len(self.loader))


def _train(model, loader, steps: int, lr: float, seed: int = 0) -> float:
    t0 = time.time()
    epochs = -(-steps // len(loader))
    fit(model, loader, TrainConfig(epochs=epochs, lr=lr, max_steps=steps, seed=seed, warmup_epochs=0.0))
    return time.time() - t0


def _static_row(name: str, model, test) -> dict:
    ev = evaluate(model, test, mode="dense")
    return {"name": name, "accuracy": ev.accuracy, "macs": float(ev.macs.mean()), "num_test": ev.num_samples}


def _latency(model, images, args) -> dict:
    """``profile_model`` repeated ``--latency-rounds`` times; the median of each number (the CPU is shared and
    the load changes between the dense and the sparse measurement, so single rounds are noisy)."""
    rounds = [
        profile_model(model, images, batch_sizes=(1, 64), threads=args.threads, min_run_time=args.min_run_time)
        for _ in range(args.latency_rounds)
    ]
    out = dict(rounds[0])
    for key, value in rounds[0].items():
        if isinstance(value, float):
            out[key] = float(torch.tensor([r[key] for r in rounds]).median())
    out["rounds"] = rounds
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/early_exit")
    p.add_argument("--train", type=int, default=20_000, help="training images (subset)")
    p.add_argument("--val-fraction", type=float, default=0.04, help="of the 60k training split, for calibration")
    p.add_argument("--test-batches", type=int, default=16, help="test batches of 128")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=75)
    p.add_argument("--recipes", default=",".join(RESNET_RECIPES + MSD_RECIPES))
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--latency-budget", type=float, default=0.5)
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--latency-rounds", type=int, default=2)
    p.add_argument("--from-scratch", action="store_true", help="train ResNet recipes from scratch for all the steps")
    p.add_argument("--tag", default="", help="suffix of the result files and plot labels")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate from scratch")
    p.add_argument("--finetune-lr", type=float, default=0.05)
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (2 on a quiet 2-core machine; on a machine shared with other jobs use 1: 2 "
        "spin-waiting OpenMP threads were measured 10-30x slower than 1 under load)",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: a few steps, 1 test batch, short timing")
    args = p.parse_args()
    if args.quick:
        args.train, args.pretrain_steps, args.finetune_steps, args.test_batches = 512, 3, 2, 1
        args.min_run_time, args.latency_rounds = 0.02, 1

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaders = build_loaders("fashion_mnist", batch_size=128, subset=args.train, val_fraction=args.val_fraction, seed=0)
    test = _Take(loaders.test, args.test_batches)
    images = torch.cat([x for x, _ in _Take(loaders.test, 2)])[:256]
    total_steps = args.pretrain_steps + args.finetune_steps
    info = machine_info()
    info["args"] = vars(args)
    (out / f"machine{args.tag}.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info), flush=True)

    base_state = None
    if args.baselines or (not args.from_scratch and any(r in RESNET_RECIPES for r in args.recipes.split(","))):
        torch.manual_seed(0)
        base = dynnet.create_model("cifar_resnet20", in_channels=1, num_classes=10)
        secs = _train(base, loaders.train, args.pretrain_steps, lr=args.lr)
        base_state = copy.deepcopy(base.state_dict())
        print(f"pretrained cifar_resnet20 in {secs:.0f}s", flush=True)

    if args.baselines:
        rows = []
        full = dynnet.create_model("cifar_resnet20", in_channels=1)
        full.load_state_dict(base_state)
        _train(full, loaders.train, args.finetune_steps, lr=args.finetune_lr, seed=1)
        rows.append(_static_row("cifar_resnet20 (dense)", full, test))
        for name, kw in (("cifar_resnet8 (truncated)", {"depth": 8}), ("cifar_resnet20 x0.5 (width)", {"width": 0.5})):
            torch.manual_seed(0)
            depth = kw.pop("depth", 20)
            m = dynnet.create_model(f"cifar_resnet{depth}", in_channels=1, **kw)
            _train(m, loaders.train, total_steps, lr=args.lr)
            rows.append(_static_row(name, m, test))
            print(rows[-1], flush=True)
        (out / "baselines.json").write_text(json.dumps({"machine": info, "baselines": rows}, indent=2))

    for recipe in args.recipes.split(","):
        t0 = time.time()
        torch.manual_seed(0)
        if recipe in MSD_RECIPES:
            model = dynnet.create_model("msdnet_tiny", recipe=recipe, in_channels=1)
            train_secs = _train(model, loaders.train, total_steps, lr=args.lr)
        elif args.from_scratch:
            model = dynnet.create_model("cifar_resnet20", recipe=recipe, in_channels=1)
            train_secs = _train(model, loaders.train, total_steps, lr=args.lr)
        else:
            kw = {"steps": 2} if recipe == "triple_wins" else {}
            model = dynnet.create_model("cifar_resnet20", recipe=recipe, in_channels=1, **kw)
            model.load_base_state_dict(base_state)
            train_secs = _train(model, loaders.train, args.finetune_steps, lr=args.finetune_lr, seed=1)
        val = collect_exits(model, loaders.val)
        tst = collect_exits(model, test)
        curve = budgeted_curve(val, tst, BUDGETS)
        # Cross-check one budget with real sparse execution, then time it.
        cal = calibrate_thresholds(val, args.latency_budget)
        model.set_thresholds(cal.thresholds)
        ev = evaluate(model, test, mode="sparse")
        lat = _latency(model, images, args)
        result = {
            "recipe": recipe + args.tag,
            "machine": machine_info(),
            "training": "from scratch" if args.from_scratch or recipe in MSD_RECIPES else "fine-tuned",
            "train_seconds": train_secs,
            "dense_macs": tst.dense_macs,
            "anytime": anytime_curve(tst),
            "budgeted": curve,
            "sparse_check": {
                "budget": args.latency_budget,
                "accuracy": ev.accuracy,
                "mac_fraction": ev.mac_fraction,
                "executed_fraction": float(ev.executed.mean()) / ev.dense_macs,
                "thresholds": [float(t) for t in cal.thresholds],
            },
            "latency": lat,
        }
        if recipe == "triple_wins":
            from dynnet.methods.early_exit.triple_wins import robust_accuracy

            result["robust"] = robust_accuracy(model, _Take(loaders.test, 2), steps=5)
        (out / f"{recipe}{args.tag}.json").write_text(json.dumps(result, indent=2))
        print(
            recipe,
            f"{time.time() - t0:.0f}s",
            [(r["budget"], round(r["test_accuracy"], 4), round(r["test_fraction"], 3)) for r in curve],
            {k: round(v, 3) for k, v in lat.items() if k.endswith("ratio")},
            flush=True,
        )
    info["end"] = machine_info()
    (out / f"machine{args.tag}.json").write_text(json.dumps(info, indent=2))
    plot(out)


def plot(out: Path) -> None:
    """accuracy_vs_macs.png and summary.csv from the JSON files in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    lines = ["recipe,budget,test_mac_fraction,test_accuracy,val_mac_fraction,b1_realized_ratio,b64_realized_ratio"]
    dense = None
    for path in sorted(out.glob("*.json")):
        if path.stem.startswith("machine") or path.stem == "baselines":
            continue
        r = json.loads(path.read_text())
        xs = [row["test_macs"] / 1e6 for row in r["budgeted"]]
        ys = [100 * row["test_accuracy"] for row in r["budgeted"]]
        ax.plot(xs, ys, "o-", label=r["recipe"], ms=4)
        lat = r["latency"]
        for row in r["budgeted"]:
            lines.append(
                f"{r['recipe']},{row['budget']},{row['test_fraction']:.4f},{row['test_accuracy']:.4f},"
                f"{row['val_fraction']:.4f},{lat['b1_realized_ratio']:.3f},{lat['b64_realized_ratio']:.3f}"
            )
        if not r["recipe"].startswith(MSD_RECIPES):
            dense = r["dense_macs"]
    base = out / "baselines.json"
    if base.exists():
        for row in json.loads(base.read_text())["baselines"]:
            ax.plot(row["macs"] / 1e6, 100 * row["accuracy"], "k*", ms=11)
            ax.annotate(row["name"], (row["macs"] / 1e6, 100 * row["accuracy"]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")  # fmt: skip
            lines.append(f"{row['name']},static,{row['macs'] / (dense or row['macs']):.4f},{row['accuracy']:.4f},,,")
    ax.set_xlabel("mean MACs per test image (M)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Early exits on Fashion-MNIST (budgets calibrated on validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_macs.png", dpi=120)
    (out / "summary.csv").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
