"""Realized speedup of sparse mode on deployed networks at 224 × 224 (issue #20): torchvision ResNet-50 and
MobileNetV2 converted with ConvNet-AIG, FBS, DynConv and SBNet.

Each network gets trained-like batch-norm statistics (:func:`dynnet.testing.matrix.trained_like_`; no ImageNet
weights can be downloaded here), is converted, its gates are scrambled to mixed decisions
(:func:`dynnet.testing.scramble_until_mixed`) and calibrated on the same noise images to ``--budget`` of the dense
MACs (the recipes' own knob; where it cannot reach the budget the scrambled point is kept and its fraction reported).
Dense and sparse mode are then timed interleaved in one process (``torch.utils.benchmark``, median of blocked runs,
``--rounds`` rounds) at each batch size. Realized ratio = (dense ms ÷ sparse ms) ÷ (1 ÷ MAC fraction): 1.0 means the
latency saving equals the MAC saving. A refused pair is recorded with its one-line reason. The load average is
recorded before and after: on a shared machine the ratios are what to read, not the milliseconds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/realized_speedup.py [--networks resnet50,mobilenet_v2]
        [--recipes convnet_aig,fbs,dynconv,sbnet] [--batch-sizes 1,8] [--out benchmarks/results/realized_speedup]

Writes ``<out>/results.csv``, ``<out>/results.jsonl`` (one row per network × recipe × batch) and ``<out>/report.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
import warnings
from pathlib import Path

import torch
from torch.utils import benchmark

import dynnet
from dynnet.bench.latency import machine_info
from dynnet.testing import diverse_inputs, scramble_until_mixed
from dynnet.testing.matrix import build_model, trained_like_


def _time(model: torch.nn.Module, x: torch.Tensor, mode: str, min_run_time: float) -> float:
    dynnet.set_mode(model, mode)
    with torch.inference_mode():
        model(x)  # warm-up: plans, caches, autotuned choices
        timer = benchmark.Timer("model(x)", globals={"model": model, "x": x})
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def run_pair(network: str, recipe: str, args: argparse.Namespace) -> list[dict]:
    base = trained_like_(build_model(f"torchvision/{network}", num_classes=1000), torch.Generator().manual_seed(0))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = dynnet.convert(base, recipe)
    except (ValueError, TypeError, NotImplementedError) as err:
        return [{"network": network, "recipe": recipe, "status": "refused", "reason": f"{type(err).__name__}: {err}"}]
    model.eval()
    images = diverse_inputs(args.images, (3, args.size, args.size), seed=1)
    scramble_until_mixed(model, images[:4])
    calibrated = ""
    try:
        report = dynnet.calibrate(model, images, args.budget, tolerance=0.03, batch_size=4)
        calibrated = f"{report.mac_fraction:.3f}"
    except ValueError as err:  # the scrambled point stays; its fraction is measured below
        calibrated = f"out of reach: {str(err).splitlines()[0][:120]}"
    dynnet.set_mode(model, "sparse")
    with torch.no_grad(), dynnet.trace() as t:
        model(images[:4])
    fraction = float(t.macs().mean()) / t.dense_macs()
    executed = float(t.executed_macs().mean()) / t.dense_macs()
    rows = []
    for batch in args.batch_sizes:
        x = images[:batch] if batch <= images.shape[0] else images.repeat(batch // images.shape[0] + 1, 1, 1, 1)[:batch]
        dense, sparse = [], []
        for _ in range(args.rounds):
            dense.append(_time(model, x, "dense", args.min_run_time))
            sparse.append(_time(model, x, "sparse", args.min_run_time))
        speedups = [d / s for d, s in zip(dense, sparse, strict=True)]
        rows.append({
            "network": network, "recipe": recipe, "status": "ok", "batch": batch, "size": args.size,
            "mac_fraction": round(fraction, 4), "executed_fraction": round(executed, 4), "calibrated": calibrated,
            "dense_ms": [round(v, 2) for v in dense], "sparse_ms": [round(v, 2) for v in sparse],
            "speedup": [round(v, 3) for v in speedups],
            "realized": [round(v * fraction, 3) for v in speedups],
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="resnet50,mobilenet_v2")
    parser.add_argument("--recipes", default="convnet_aig,fbs,dynconv,sbnet")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/realized_speedup"))
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    load_before = os.getloadavg()[0]
    start = time.time()
    rows = []
    for network in args.networks.split(","):
        for recipe in args.recipes.split(","):
            rows += run_pair(network, recipe, args)
    machine["loadavg_1m_after"] = os.getloadavg()[0]
    machine["loadavg_1m_before"] = load_before
    with open(args.out / "results.jsonl", "w") as f:
        f.write(json.dumps({"machine": machine, "settings": {k: str(v) for k, v in vars(args).items()}}) + "\n")
        for row in rows:
            f.write(json.dumps(row) + "\n")
    fields = ["network", "recipe", "status", "batch", "size", "mac_fraction", "executed_fraction", "calibrated",
              "dense_ms", "sparse_ms", "speedup", "realized", "reason"]  # fmt: skip
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})
    lines = [
        "# Realized speedup at 224 × 224 (issue #20)",
        "",
        f"Generated by `benchmarks/realized_speedup.py` on {machine.get('date')}, {machine.get('machine')}, "
        f"{machine.get('cpu_count')} cores, {torch.get_num_threads()} thread(s), torch {torch.__version__}; load "
        f"average {load_before:.1f} before, {machine['loadavg_1m_after']:.1f} after ({time.time() - start:.0f} s). "
        "Trained-like batch-norm statistics, scrambled gates calibrated on noise images to the budget: a measurement "
        "of execution, not of a trained policy. Realized = latency speedup ÷ MAC speedup, one value per round.",
        "",
        "| network | recipe | batch | MAC fraction | executed | dense ms | sparse ms | speedup | realized |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['network']} | {row['recipe']} | — | refused: {row['reason']} | | | | | |")
            continue
        lines.append(
            f"| {row['network']} | {row['recipe']} | {row['batch']} | {row['mac_fraction']:.3f} | "
            f"{row['executed_fraction']:.3f} | {row['dense_ms']} | {row['sparse_ms']} | {row['speedup']} | "
            f"{row['realized']} |"
        )
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}/report.md")


if __name__ == "__main__":
    main()
