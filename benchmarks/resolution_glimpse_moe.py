"""Adaptive resolution (RANet), glimpses (RAM, DT-RAM, GFNet, DCN, LSTS, visual attention) and mixture of experts
(sparse MoE): accuracy vs MACs.

1. Trains a full-resolution static baseline (``cifar_resnet8``, 1 input channel) and every glimpse/resolution
   recipe from scratch on a subset of Cluttered Fashion-MNIST (64×64 canvases, real test images), with the
   recipe's own objective (:func:`dynnet.train.fit`).
2. Sweeps each recipe's operating point after training (no retraining): RANet and GFNet exit thresholds
   calibrated on the validation split for a geometric exit schedule ``p_s ∝ q^s``; DCN's saliency threshold;
   RAM's learned halting (one point) and "every glimpse" (its dense mode); DT-RAM (RAM with a stop action,
   trained with its :class:`~dynnet.methods.early_exit.dt_ram.DTRAMCurriculum`: fixed glimpses, then stopping)
   at its learned stop rule, at stop thresholds calibrated on validation for MAC budgets 0.4 / 0.6 / 0.8
   (:meth:`DTRAM.calibrate`) and every glimpse; LSTS (learned keep gates of its sampled patches, budget 0.5) and
   the visual-attention LSTM (ACT halting) at their learned point and in dense mode (every patch / step).
   RAM and DT-RAM are tiny recurrent networks (~1/20 of ResNet-8's training cost per image) that learn slowly by
   REINFORCE: they train for ``--glimpse-rnn-epochs`` epochs (same data), the others for ``--epochs``.
3. Evaluates each point in sparse mode on real test images (:func:`dynnet.train.evaluate`) and times dense vs
   sparse execution of one operating point per recipe at batch 1 and 64 (:func:`dynnet.bench.harness.profile_model`,
   dense = the recipe's own static path: every sub-network / glimpse / step, or the fine network everywhere).
4. Sparse MoE: converts ``cifar_resnet8`` on plain Fashion-MNIST (28×28), trains it with the balancing losses and
   logs the expert load of every block on the test images; checks sparse dispatch == dense weighted sum.
5. Writes ``<out>/results.json`` (settings, machine info with date, load average and threads at the start and the
   end, every point, profiles with the realized speedup ÷ MAC speedup at batch 1 and 64, MoE loads),
   ``points.csv``, ``profiles.csv`` and ``accuracy_vs_macs.png`` (``<out>``: default
   ``benchmarks/results/resolution_glimpse_moe``).

    .venv/bin/python benchmarks/resolution_glimpse_moe.py [--subset 7000] [--epochs 2] [--test-images 2000]
    .venv/bin/python benchmarks/resolution_glimpse_moe.py --quick --threads 1 --out /tmp/bench_check/glimpse

Default schedule and time estimate (quiet 2-core CPU, 2 threads; from the CPU time of a few timed training steps
of every model at 1 thread, scaled by ResNet-20's measured ~800 training images/s at 2 threads): 7,000 training
canvases × 2 epochs, batch 64, AdamW: static ResNet-8 ~40 s, ranet ~32 s, gfnet ~34 s,
dcn ~8 s, lsts ~24 s, visual_attention_action ~160 s (its LSTM reads a ResNet-8 feature map per step), ram and
dt_ram 8 epochs ~8 s each; sparse MoE 2 epochs of 28×28 images ~22 s; sweeps on 2,000 test canvases (~60 s) and
timing of 9 models (~40 s): **about 8 minutes** in all (≤ 10 min).

The load average is stored with the results: timings under load are noisy.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import dynnet
from dynnet.bench.harness import profile_model
from dynnet.bench.latency import machine_info
from dynnet.data import build_loaders
from dynnet.methods.early_exit.dt_ram import DTRAMCurriculum
from dynnet.train import TrainConfig, evaluate, fit

OUT = Path(__file__).resolve().parent / "results" / "resolution_glimpse_moe"
GLIMPSE_RECIPES = ("ranet", "ram", "dt_ram", "gfnet", "dcn", "lsts", "visual_attention_action")
RNN_RECIPES = ("ram", "dt_ram")  # trained for --glimpse-rnn-epochs
DT_RAM_BUDGETS = (0.4, 0.6, 0.8)


def _batches(loader: Any, limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, seen = [], 0
    for x, y in loader:
        out.append((x, y))
        seen += x.shape[0]
        if seen >= limit:
            break
    return out


def _geometric(num: int, q: float) -> torch.Tensor:
    p = torch.tensor([q**s for s in range(num)], dtype=torch.float64)
    return p / p.sum()


def _eval(model: torch.nn.Module, batches: list, static_macs: float) -> dict[str, float]:
    ev = evaluate(model, batches, mode="sparse")
    return {
        "accuracy": ev.accuracy,
        "mean_macs": float(ev.macs.mean()),
        "mean_executed_macs": float(ev.executed.mean()),
        "recipe_dense_macs": ev.dense_macs,
        "fraction_of_static": float(ev.macs.mean()) / static_macs,
    }


def _train(
    model: torch.nn.Module,
    loaders: Any,
    args: argparse.Namespace,
    lr: float,
    epochs: int | None = None,
    hooks: tuple = (),
) -> dict[str, Any]:
    epochs = args.epochs if epochs is None else epochs
    cfg = TrainConfig(epochs=epochs, lr=lr, optimizer="adamw", weight_decay=1e-4, progress=False, device="cpu", seed=0)
    start = time.time()
    result = fit(model, loaders.train, cfg, hooks=list(hooks))
    return {"seconds": round(time.time() - start, 1), "epochs": epochs, "history": result.history}


def _dense_point(model: torch.nn.Module, test: list, static_macs: float, setting: str) -> dict[str, Any]:
    dense = evaluate(model, test, mode="dense")
    return {
        "setting": setting,
        "accuracy": dense.accuracy,
        "mean_macs": float(dense.macs.mean()),
        "fraction_of_static": float(dense.macs.mean()) / static_macs,
    }


def _profile(model: torch.nn.Module, images: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    return profile_model(
        model, images, batch_sizes=(1, 64), threads=args.threads, min_run_time=args.min_run_time, batch1_samples=16
    )


def run_glimpse(args: argparse.Namespace, results: dict[str, Any]) -> None:
    loaders = build_loaders("cluttered_fashion_mnist", batch_size=64, subset=args.subset, val_fraction=0.1, seed=0)
    test = _batches(loaders.test, args.test_images)
    val = _batches(loaders.val, args.val_images)
    images = torch.cat([x for x, _ in test])[:64]

    torch.manual_seed(0)
    static = dynnet.create_model("cifar_resnet8", in_channels=1, num_classes=10)
    train = _train(static, loaders, args, lr=2e-3)
    ev = evaluate(static, test, mode="dense")
    static_macs = float(ev.macs.mean())
    results["static"] = {"model": "cifar_resnet8 (64x64)", "accuracy": ev.accuracy, "macs": static_macs, **train}
    results["profiles"]["static"] = _profile(static, images, args)
    print(f"static: acc {ev.accuracy:.4f} MACs {static_macs / 1e6:.2f}M", flush=True)

    for recipe in args.recipes:
        if recipe not in GLIMPSE_RECIPES:
            continue
        try:  # one failing recipe must not lose the others' results
            _glimpse_recipe(recipe, args, loaders, test, val, images, static_macs, results)
        except Exception as exc:
            traceback.print_exc()
            results["errors"][recipe] = f"{type(exc).__name__}: {exc}"
            _write(results)


def _glimpse_recipe(
    recipe: str, args: argparse.Namespace, loaders: Any, test: list, val: list, images: torch.Tensor,
    static_macs: float, results: dict[str, Any],
) -> None:  # fmt: skip
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe=recipe, in_channels=1, num_classes=10)
    epochs = args.glimpse_rnn_epochs if recipe in RNN_RECIPES else args.epochs
    hooks = (DTRAMCurriculum(),) if recipe == "dt_ram" else ()
    train = _train(model, loaders, args, lr=2e-3, epochs=epochs, hooks=hooks)
    points = []
    if recipe == "ranet":
        conf = torch.cat([model.exit_confidences(x) for x, _ in val])
        for q in (0.25, 0.5, 1.0, 2.0, None):
            if q is None:
                model.net.thresholds.fill_(float("inf"))
            else:
                model.calibrate(conf, q)
            points.append({"setting": f"q={q}" if q else "all exits", **_eval(model, test, static_macs)})
        model.calibrate(conf, 1.0)
    elif recipe == "gfnet":
        model.eval()
        conf = torch.cat([model.step_confidences(x) for x, _ in val])
        for q in (0.25, 0.5, 1.0, 2.0, None):
            if q is None:
                model.net.thresholds.fill_(float("inf"))
            else:
                model.calibrate(conf, _geometric(conf.shape[1], q))
            points.append({"setting": f"q={q}" if q else "all steps", **_eval(model, test, static_macs)})
        model.calibrate(conf, _geometric(conf.shape[1], 1.0))
    elif recipe == "dcn":
        for thr in (0.5, 1.0, 1.5, 2.0, 3.0):
            model.net.saliency_threshold.fill_(thr)
            points.append({"setting": f"threshold={thr}", **_eval(model, test, static_macs)})
        model.net.saliency_threshold.fill_(1.0)
    elif recipe == "ram":
        points.append({"setting": "learned halting", **_eval(model, test, static_macs)})
        points.append(_dense_point(model, test, static_macs, "every glimpse (dense)"))
    elif recipe == "dt_ram":
        points.append({"setting": "learned stop (P>=0.5)", **_eval(model, test, static_macs)})
        for b in DT_RAM_BUDGETS:
            cal = model.calibrate(val, b)
            points.append({
                "setting": f"budget={b}",
                **_eval(model, test, static_macs),
                "val_fraction_achieved": cal.achieved_fraction,
                "thresholds": model.thresholds.tolist(),
            })  # fmt: skip
        points.append(_dense_point(model, test, static_macs, "every glimpse (dense)"))
        model.calibrate(val, 0.6)  # the timed operating point
    elif recipe == "lsts":
        points.append({"setting": "learned keep gates (budget 0.5)", **_eval(model, test, static_macs)})
        points.append(_dense_point(model, test, static_macs, "every patch (dense)"))
    elif recipe == "visual_attention_action":
        points.append({"setting": "learned halting (ACT)", **_eval(model, test, static_macs)})
        points.append(_dense_point(model, test, static_macs, "every step (dense)"))
    for p in points:
        print(f"{recipe} {p['setting']}: acc {p['accuracy']:.4f} MACs {p['mean_macs'] / 1e6:.2f}M", flush=True)
    results["recipes"][recipe] = {"points": points, **train}
    results["profiles"][recipe] = _profile(model, images, args)
    _write(results)


def run_moe(args: argparse.Namespace, results: dict[str, Any]) -> None:
    loaders = build_loaders("fashion_mnist", batch_size=128, subset=args.subset, val_fraction=0.1, seed=0)
    test = _batches(loaders.test, args.test_images)
    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="sparse_moe", in_channels=1, num_classes=10)
    train = _train(model, loaders, args, lr=2e-3)
    model.eval()
    loads: dict[str, torch.Tensor] = {}
    max_diff = 0.0
    for x, _ in test:
        dynnet.set_mode(model, "masked")
        with torch.no_grad():
            masked = model(x)
        dynnet.set_mode(model, "sparse")
        with torch.no_grad(), dynnet.trace() as t:
            sparse = model(x)
        max_diff = max(max_diff, float((masked - sparse).abs().max()))
        for k, v in t.outputs.items():
            if k.endswith("/load"):
                loads[k] = loads.get(k, 0) + v
    ev = _eval(model, test, float(evaluate(model, test[:1], mode="dense").macs.mean()))
    results["moe"] = {
        "dataset": "fashion_mnist 28x28",
        **ev,
        "expert_load_fraction": {k: (v / v.sum()).tolist() for k, v in loads.items()},
        "max_abs_diff_sparse_vs_dense_weighted_sum": max_diff,
        **train,
    }
    images = torch.cat([x for x, _ in test])[:64]
    results["profiles"]["sparse_moe"] = _profile(model, images, args)
    print(f"sparse_moe: acc {ev['accuracy']:.4f} loads {results['moe']['expert_load_fraction']}", flush=True)


def _write(results: dict[str, Any]) -> None:
    out = Path(results["settings"]["out"])
    out.mkdir(parents=True, exist_ok=True)
    results["machine_end"] = machine_info()
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    rows = [{"recipe": r, **{k: v for k, v in p.items()}} for r, d in results["recipes"].items() for p in d["points"]]
    if "static" in results:
        s = results["static"]
        rows.insert(0, {"recipe": "static", "setting": s["model"], "accuracy": s["accuracy"], "mean_macs": s["macs"]})
    _csv(out / "points.csv", rows)
    _csv(out / "profiles.csv", [{"model": k, **v} for k, v in results["profiles"].items()])
    _plot(results, out)


def _csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for recipe, d in results["recipes"].items():
        pts = sorted(d["points"], key=lambda p: p["mean_macs"])
        ax.plot([p["mean_macs"] / 1e6 for p in pts], [100 * p["accuracy"] for p in pts], "o-", label=recipe)
    if "static" in results:
        s = results["static"]
        ax.plot([s["macs"] / 1e6], [100 * s["accuracy"]], "k*", markersize=12, label="static cifar_resnet8")
    ax.set_xscale("log")
    ax.set_xlabel("mean MACs per image (millions, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Cluttered Fashion-MNIST 64×64 (short schedule, subset)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_macs.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=[*GLIMPSE_RECIPES, "sparse_moe"])
    parser.add_argument("--subset", type=int, default=7000, help="training images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--glimpse-rnn-epochs", type=int, default=8, help="epochs of ram and dt_ram")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--quick", action="store_true", help="smoke test: 256 images, 1 epoch, 64 test images")
    args = parser.parse_args()
    if args.quick:
        args.subset, args.epochs, args.glimpse_rnn_epochs, args.test_images, args.val_images = 256, 1, 1, 64, 64
        args.min_run_time = 0.02
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "settings": vars(args),
        "machine": machine_info(),
        "recipes": {},
        "profiles": {},
        "errors": {},
    }
    if any(r in GLIMPSE_RECIPES for r in args.recipes):
        run_glimpse(args, results)
    if "sparse_moe" in args.recipes:
        try:
            run_moe(args, results)
        except Exception as exc:
            traceback.print_exc()
            results["errors"]["sparse_moe"] = f"{type(exc).__name__}: {exc}"
    _write(results)
    if results["errors"]:
        raise SystemExit(f"failed recipes: {results['errors']}")


if __name__ == "__main__":
    main()
