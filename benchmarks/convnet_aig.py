"""ConvNet-AIG on Fashion-MNIST (ResNet-20): accuracy, MACs and realized speedup at batch 1 and 64.

Trains ``cifar_resnet20`` + ``convnet_aig`` at budget 0.5 with :func:`dynnet.bench.experiment.run_experiment`
(short schedule on a subset), tests it in sparse mode on the 10,000 test images, times dense vs sparse execution
with :func:`dynnet.bench.harness.profile_model` on real test images, and profiles (``torch.profiler``) one sparse
and one dense pass at batch 1 and 64 to show where the time goes. As a systems check that does not depend on
how far the short training moved the gates, the same network with scrambled (random) gates is timed too.

Writes to ``<out>`` (default ``benchmarks/results/convnet_aig/``): ``results.json`` (settings, test metrics,
profile rows with the realized speedup ÷ MAC speedup at batch 1 and 64, machine info with date, load average and
threads, history), ``results.csv`` (one row), ``profile_ops.txt`` (operator tables) and ``convnet_aig.png``.

    .venv/bin/python benchmarks/convnet_aig.py [--epochs 3] [--subset 30000] [--budget 0.5] [--threads 2]
    .venv/bin/python benchmarks/convnet_aig.py --profile-only     # re-time the trained checkpoint
    .venv/bin/python benchmarks/convnet_aig.py --quick --threads 1 --out /tmp/bench_check/convnet_aig

Default schedule and time estimate (quiet 2-core CPU, 2 threads): 30,000 training images × 3 epochs (705 SGD
steps; measured 111 s on the quiet machine at 15:46 UTC, 2026-11-25), sparse and masked test on the 10,000 test
images (~15 s), timing of the trained and the scrambled network at 1 s per configuration (~15 s) and the operator
profiles (~5 s): **about 2.5 minutes** (≤ 3 min).

The CPU may be shared: the load average is recorded, and timings under load are noisy.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
from pathlib import Path

import torch

import dynnet
from dynnet.bench.experiment import run_experiment
from dynnet.bench.harness import profile_model
from dynnet.bench.latency import machine_info
from dynnet.testing import scramble_gates
from dynnet.train import load_checkpoint

OUT = Path(__file__).resolve().parent / "results" / "convnet_aig"


def _profile_ops(model: torch.nn.Module, images: torch.Tensor, mode: str, batch: int, rows: int = 15) -> str:
    """Operator table of ``model`` in ``mode``: batch 1 runs 32 images one by one, else one batch."""
    from torch.profiler import ProfilerActivity, profile

    model.eval()
    dynnet.set_mode(model, mode)
    xs = list(images[:32].split(1)) if batch == 1 else [images[:batch]]
    with torch.inference_mode():
        for x in xs[:3]:
            model(x)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for x in xs:
                model(x)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"== {mode} mode, batch {batch} ({len(xs)} calls) ==\n{table}\n"


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, q = result["profile"], result.get("profile_scrambled", {})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, b in zip(axes[:2], (1, 64), strict=True):
        labels = ["dense", "sparse\n(trained gates)"]
        values = [p[f"b{b}_dense_ms"], p[f"b{b}_sparse_ms"]]
        title = (
            f"batch {b} — trained: ×{p[f'b{b}_latency_speedup']:.2f} latency / ×{p[f'b{b}_mac_speedup']:.2f} MACs"
            f" = {p[f'b{b}_realized_ratio']:.2f}"
        )
        if q:
            labels.append("sparse\n(scrambled gates)")
            values.append(q[f"b{b}_sparse_ms"])
            title += (
                f"\nscrambled: ×{q[f'b{b}_latency_speedup']:.2f} / ×{q[f'b{b}_mac_speedup']:.2f}"
                f" = {q[f'b{b}_realized_ratio']:.2f}"
            )
        ax.bar(labels, values, color=["#888", "#2a7", "#d84"][: len(values)])
        ax.set_title(title, fontsize=8)
        ax.set_ylabel("ms / image" if b == 1 else "ms / batch of 64")
    hist = result["history"]
    ax = axes[2]
    epochs = [h["epoch"] + 1 for h in hist]
    ax.plot(epochs, [h.get("val_accuracy", float("nan")) for h in hist], "o-", label="val accuracy")
    ax.plot(epochs, [h.get("val_mac_fraction", float("nan")) for h in hist], "s--", label="val MAC fraction")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1.05)
    ax.legend()
    t = result["test"]
    ax.set_title(f"test accuracy {100 * t['accuracy']:.2f} %, MAC fraction {100 * t['mac_fraction']:.1f} %", fontsize=8)
    m = result["machine"]
    fig.suptitle(
        f"ConvNet-AIG, ResNet-20, Fashion-MNIST — {m['date']}, {m['cpu_count']} CPUs shared, {p['threads']} threads, "
        f"load average {m['loadavg_1m']} (timings under load are noisy)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _test_images(n: int = 64) -> torch.Tensor:
    from dynnet.data import build_loaders

    xs, got = [], 0
    for x, _ in build_loaders("fashion_mnist", batch_size=64, val_fraction=0.0).test:
        xs.append(x)
        got += x.shape[0]
        if got >= n:
            break
    return torch.cat(xs)[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=30_000)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--run-dir", default="runs/bench_convnet_aig", help="checkpoint and log (not committed)")
    parser.add_argument("--out", type=Path, default=OUT, help="results folder")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 256 images, 1 epoch, short timing, run dir under --out"
    )
    parser.add_argument(
        "--profile-only", action="store_true", help="re-time the trained checkpoint of --run-dir (e.g. when idle)"
    )
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.subset, args.min_run_time = 1, 256, 0.02
        args.run_dir = str(Path(args.out) / "run")
    out = Path(args.out)

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_dir = Path(args.run_dir)
    if not args.profile_only:
        result = run_experiment(
            "cifar_resnet20", "convnet_aig", budget=args.budget, dataset="fashion_mnist", epochs=args.epochs,
            subset=args.subset, out_dir=run_dir, threads=args.threads, min_run_time=args.min_run_time,
        )  # fmt: skip
        print(result.summary())
    data = json.loads((run_dir / "results.json").read_text())
    model, _ = load_checkpoint(run_dir / "checkpoint")
    images = _test_images(64)
    if args.profile_only:
        data["profile"] = profile_model(
            model, images, batch_sizes=(1, 64), threads=args.threads, min_run_time=args.min_run_time
        )
        data["machine"] = machine_info()
        print(json.dumps(data["profile"], indent=1))
    # Systems check independent of how far training got: the same network with random gates (about half the
    # blocks skipped per image), timed on the same real images. Its accuracy is meaningless; its latency is not.
    scrambled = copy.deepcopy(model)
    scramble_gates(scrambled, seed=3)
    data["profile_scrambled"] = profile_model(
        scrambled, images, batch_sizes=(1, 64), threads=args.threads, min_run_time=args.min_run_time
    )
    data["machine_after_scrambled"] = machine_info()
    print(json.dumps(data["profile_scrambled"], indent=1))

    data["machine_end"] = machine_info()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    row = {**data["settings"], **{f"test_{k}": v for k, v in data["test"].items()}, **data["profile"],
           "loadavg_1m": data["machine"]["loadavg_1m"], "date": data["machine"]["date"]}  # fmt: skip
    row = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in row.items()}
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)

    # Where the time goes: operator tables of sparse vs dense execution on the same test images.
    text = "".join(_profile_ops(model, images, mode, b) for b in (1, 64) for mode in ("dense", "sparse"))
    (out / "profile_ops.txt").write_text(f"machine: {json.dumps(machine_info())}\n\n{text}")
    _plot(data, out / "convnet_aig.png")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
