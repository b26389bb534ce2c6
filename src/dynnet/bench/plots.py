"""The suite's figures (matplotlib, Agg backend): accuracy vs MACs with the static front, accuracy vs latency,
realized speedup, per-sample MAC histograms (correct vs wrong), and example images with their decisions.

Every function takes the suite's rows (dicts, see :func:`dynnet.bench.suite.run_job`) and writes one PNG.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from dynnet.bench.front import aggregate, pareto_front
from dynnet.bench.latency_extras import latency_extra

__all__ = [
    "plot_accuracy_vs_latency",
    "plot_accuracy_vs_macs",
    "plot_decisions",
    "plot_latency_budget",
    "plot_mac_histograms",
    "plot_realized_speedup",
    "write_plots",
]

_MARKERS = "os^vD<>ph*XP"


def _style(recipes: Sequence[str]) -> dict[str, tuple[Any, str]]:
    cmap = plt.get_cmap("tab20")
    return {r: (cmap(i % 20), _MARKERS[(i // 20 + i) % len(_MARKERS)]) for i, r in enumerate(sorted(recipes))}


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _recipe_groups(agg: Sequence[dict[str, Any]], dataset: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in agg:
        if r["kind"] == "recipe" and r["dataset"] == dataset:
            groups.setdefault(r["recipe"], []).append(r)
    return {k: sorted(v, key=lambda r: r["mean_macs"]) for k, v in groups.items()}


def plot_accuracy_vs_macs(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, dataset: str) -> Path:
    """Top-1 accuracy vs mean MACs per image: static baselines, their Pareto front, every recipe's budgets."""
    agg = aggregate(rows)
    static = [r for r in agg if r["kind"] == "static" and r["dataset"] == dataset]
    groups = _recipe_groups(agg, dataset)
    style = _style(list(groups))
    fig, ax = plt.subplots(figsize=(10, 6.5))
    if static:
        ax.scatter([r["mean_macs"] / 1e6 for r in static], [100 * r["accuracy"] for r in static], c="0.45",
                   marker="s", s=36, zorder=3, label="static baselines")  # fmt: skip
        for r in static:
            ax.annotate(f"d{r.get('depth')}×{r['width']:g}", (r["mean_macs"] / 1e6, 100 * r["accuracy"]),
                        fontsize=6, color="0.35", xytext=(3, -8), textcoords="offset points")  # fmt: skip
        front = pareto_front([(r["mean_macs"], r["accuracy"]) for r in static])
        xs, ys = _front_curve(front)
        ax.plot(xs / 1e6, 100 * ys, "k--", lw=1.2, zorder=2, label="static Pareto front (linear in MACs)")
    for name, pts in groups.items():
        color, marker = style[name]
        ax.plot([r["mean_macs"] / 1e6 for r in pts], [100 * r["accuracy"] for r in pts], marker=marker, color=color,
                lw=0.8, ms=5, label=name)  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.tick_params(axis="x", which="minor", labelsize=6)
    ax.set_xlabel("mean MACs per image (M, theoretical, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"accuracy vs MACs — {dataset} (sparse execution)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, Path(path))


def _front_curve(front: Sequence[tuple[float, float]], steps: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """The front as :func:`~dynnet.bench.report.front_accuracy` defines it (linear in MACs), densely sampled so that
    it is drawn right on a log axis."""
    if len(front) == 1:
        return np.array([front[0][0]]), np.array([front[0][1]])
    xs, ys = [], []
    for (m0, a0), (m1, a1) in itertools.pairwise(front):
        t = np.linspace(0.0, 1.0, steps)
        xs.append(m0 + t * (m1 - m0))
        ys.append(a0 + t * (a1 - a0))
    return np.concatenate(xs), np.concatenate(ys)


def plot_accuracy_vs_latency(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, dataset: str, batch: int = 64
) -> Path:
    """Top-1 accuracy vs measured sparse latency at ``batch`` (ms per batch; per image at batch 1)."""
    agg = aggregate(rows)
    key = f"b{batch}_sparse_ms"
    static = [r for r in agg if r["kind"] == "static" and r["dataset"] == dataset and key in r]
    groups = _recipe_groups(agg, dataset)
    style = _style(list(groups))
    fig, ax = plt.subplots(figsize=(10, 6.5))
    if static:
        ax.scatter([r[key] for r in static], [100 * r["accuracy"] for r in static], c="0.45", marker="s", s=36,
                   zorder=3, label="static baselines")  # fmt: skip
        front = pareto_front([(r[key], r["accuracy"]) for r in static])
        ax.plot([m for m, _ in front], [100 * a for _, a in front], "k--", lw=1.2, label="static latency front")
    for name, pts in groups.items():
        pts = sorted((r for r in pts if r.get(key)), key=lambda r: r[key])
        if not pts:
            continue
        color, marker = style[name]
        ax.plot([r[key] for r in pts], [100 * r["accuracy"] for r in pts], marker=marker, color=color, lw=0.8, ms=5,
                label=name)  # fmt: skip
    ax.set_xscale("log")
    unit = "ms per image" if batch == 1 else f"ms per batch of {batch}"
    ax.set_xlabel(f"sparse-mode latency ({unit}, median, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"accuracy vs latency at batch {batch} — {dataset} (shared CPU: noisy)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, Path(path))


def plot_realized_speedup(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Per recipe × budget: realized speedup ÷ MAC speedup at batch 1 and 64 (1.0 = MAC saving fully realized)."""
    items = sorted((r for r in aggregate(rows) if r["kind"] == "recipe"), key=lambda r: (r["recipe"], r["budget"]))
    labels = [f"{r['recipe']} {r['budget']:g}" for r in items]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(items) + 2), 4.5))
    x = np.arange(len(items))
    for off, b, color in ((-0.2, 1, "tab:blue"), (0.2, 64, "tab:orange")):
        vals = [r.get(f"b{b}_realized_ratio") or math.nan for r in items]
        ax.bar(x + off, vals, width=0.4, color=color, label=f"batch {b}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, labels, rotation=90, fontsize=6)
    ax.set_ylabel("latency speedup ÷ MAC speedup")
    ax.set_title("realized speedup ratio (sparse vs dense of the same base)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, Path(path))


def _pick_budget(items: list[dict[str, Any]], target: float = 0.5) -> dict[str, Any]:
    return min(items, key=lambda r: abs((r.get("budget") or 0) - target))


def plot_mac_histograms(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, budget: float = 0.5) -> Path:
    """Per recipe (at the budget nearest ``budget``): per-sample MACs of correctly vs wrongly classified images.

    "Easy" inputs (correct) should cost less than "hard" ones (wrong) when the policy adapts to difficulty.
    """
    by_recipe: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if (
            r.get("status") == "ok"
            and r["kind"] == "recipe"
            and r.get("seed") == min(q.get("seed", 0) for q in rows if q.get("recipe") == r["recipe"])
        ):
            by_recipe.setdefault(r["recipe"], []).append(r)
    names = sorted(by_recipe)
    cols = 6
    nrows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.0 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        r = _pick_budget(by_recipe[name], budget)
        h = r.get("mac_hist") or {}
        edges = np.asarray(h.get("edges", []), dtype=float)
        if edges.size < 2:
            continue
        ax.set_visible(True)
        widths = np.diff(edges)
        for key, color, label in (("correct", "tab:green", "correct"), ("incorrect", "tab:red", "wrong")):
            counts = np.asarray(h.get(key, []), dtype=float)
            total = counts.sum()
            if total > 0:
                ax.bar(edges[:-1], counts / total, width=widths, align="edge", alpha=0.55, color=color,
                       label=f"{label} ({int(total)})")  # fmt: skip
        ax.axvline(r.get("budget") or 0, color="k", lw=0.7, ls=":")
        ax.set_title(f"{name} b={r['budget']:g}", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_xlim(0, edges[-1])
        ax.legend(fontsize=5)
    fig.supxlabel("per-sample MACs / dense MACs of the base (dotted: budget; the last bin holds everything ≥ 1.45)",
                  fontsize=8)  # fmt: skip
    fig.supylabel("fraction of images", fontsize=8)
    fig.suptitle("per-sample MAC distribution: correct (easy) vs wrong (hard) test images", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


def _overlay(values: list[float], shape: list[int], size: tuple[int, int]) -> np.ndarray | None:
    """A spatial decision (…, h, w) as a mask over the image (nearest upsampling, mean over leading dims)."""
    if len(shape) < 2:
        return None
    arr = np.asarray(values, dtype=float).reshape(shape)
    while arr.ndim > 2:
        arr = arr.mean(0)
    h, w = arr.shape
    rows = (np.arange(size[0]) * h // size[0]).clip(0, h - 1)
    cols = (np.arange(size[1]) * w // size[1]).clip(0, w - 1)
    return arr[np.ix_(rows, cols)]


def plot_decisions(row: dict[str, Any], examples: dict[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Example test images with the decisions one model took on them.

    Top: each image with its prediction, target and MAC fraction; spatial decisions (granularity ``spatial`` or
    ``block`` with a spatial shape) are shown as a mask over the image (mean over layers). Bottom: one row per
    recorded decision, one column per image: the fraction of units switched on (layers run, channels kept, exit
    taken, experts used...) — generic over ``Trace.decisions``.

    Returns:
        The PNG path, or ``None`` when the row has no examples.
    """
    ex = row.get("examples") or {}
    images = np.asarray(examples.get("images", []), dtype=float) / 255.0
    if not ex or images.size == 0:
        return None
    n = images.shape[0]
    decisions = ex.get("decisions", [])
    size = images.shape[-2:]
    spatial = [d for d in decisions if d["granularity"] in ("spatial", "block") and len(d["shape"]) >= 2]
    scalar_rows, scalar_names = [], []
    for d in decisions:
        vals = np.asarray(d["values"], dtype=float)
        scalar_rows.append(vals.mean(1) if vals.ndim == 2 and vals.shape[1] else vals.reshape(n, -1).mean(1))
        scalar_names.append(f"{d['name']} [{d['granularity']}]")
    height = 2.0 + 0.22 * max(1, len(scalar_rows))
    fig = plt.figure(figsize=(1.5 * n + 1.5, height + 1.6))
    grid = fig.add_gridspec(2, n, height_ratios=[1.6, 0.22 * max(1, len(scalar_rows)) + 0.4])
    classes = examples.get("classes", [])
    macs, dense = ex.get("macs"), ex.get("dense_macs")
    for i in range(n):
        ax = fig.add_subplot(grid[0, i])
        img = images[i]
        ax.imshow(img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1), cmap="gray", vmin=0, vmax=1)
        masks = [m for m in (_overlay(d["values"][i], d["shape"], size) for d in spatial) if m is not None]
        if masks:
            ax.imshow(np.mean(masks, 0), cmap="magma", alpha=0.45, vmin=0, vmax=1)
        pred, target = ex["pred"][i], examples["targets"][i]
        frac = f"\n{macs[i] / dense:.2f} MACs" if macs and dense else ""
        ax.set_title(f"{_class_name(classes, pred)}{'' if pred == target else ' ✗'}{frac}", fontsize=7,
                     color="k" if pred == target else "tab:red")  # fmt: skip
        ax.axis("off")
    if scalar_rows:
        ax = fig.add_subplot(grid[1, :])
        mat = np.stack(scalar_rows)
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=max(1.0, float(np.nanmax(mat))))
        ax.set_yticks(range(len(scalar_names)), scalar_names, fontsize=6)
        ax.set_xticks(range(n), [f"img {i}" for i in range(n)], fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01).ax.tick_params(labelsize=6)
    suffix = " (mask: mean spatial decision)" if spatial else ""
    fig.suptitle(f"{row['recipe']} budget {row.get('budget')}: decisions on test images{suffix}", fontsize=9)
    return _save(fig, Path(path))


def _class_name(classes: Sequence[str], k: int) -> str:
    return classes[k] if 0 <= k < len(classes) else str(k)


def plot_latency_budget(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Three panels of the latency extras: measured latency after ``calibrate(budget_ms=t)`` against the target t
    (and its recheck), each block's kept fraction against its measured cost per MAC, and accuracy against measured
    latency of the MAC- and latency-budget fine-tunes."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    targets: list[float] = []
    for r in sorted(rows, key=lambda r: r["job"]):
        lat = latency_extra(r)
        if lat is None:
            continue
        name = r["recipe"]
        cal = [c for c in lat["calibration"] if "measured_ms" in c]
        targets += [c["target_ms"] for c in lat["calibration"]]
        axes[0].plot([c["target_ms"] for c in cal], [c["measured_ms"] for c in cal], "o-", label=f"{name}")
        axes[0].plot([c["target_ms"] for c in cal], [c["recheck_ms"] for c in cal], "x", color="grey")
        blocks = [b for b in lat["blocks"] if b.get("ns_per_mac") is not None]
        axes[1].scatter([b["ns_per_mac"] for b in blocks], [b["kept"] for b in blocks], label=name)
        for kind, style in (("mac", "s--"), ("latency", "o-")):
            curve = [c for c in (lat.get("training") or {}).get(kind, {}).get("curve", []) if "measured_ms" in c]
            if curve:
                axes[2].plot([c["measured_ms"] for c in curve], [100 * c["accuracy"] for c in curve], style,
                             label=f"{name} ({kind} budget)")  # fmt: skip
    if targets:
        axes[0].plot([min(targets), max(targets)], [min(targets), max(targets)], "k:", lw=1)
    axes[0].set(xlabel="target ms / image", ylabel="measured ms (x: recheck)", title="calibrate(budget_ms=)")
    axes[1].set(xlabel="block cost, ns per MAC (measured)", ylabel="kept fraction", title="where the work goes")
    axes[2].set(xlabel="measured ms / image", ylabel="accuracy %", title="MAC vs latency budget")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    return _save(fig, Path(path))


def write_plots(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str]) -> dict[str, Path | list[Path]]:
    """Every figure of a suite folder; returns name → path(s) (for the report's links)."""
    out = Path(out_dir)
    ok = [r for r in rows if r.get("status") == "ok"]
    datasets = sorted({r["dataset"] for r in ok}, key=lambda d: (d != _main_dataset(ok), d))
    plots: dict[str, Path | list[Path]] = {}
    for d in datasets:
        tag = "" if d == datasets[0] else f"_{d}"
        plots[f"accuracy vs MACs{tag}"] = plot_accuracy_vs_macs(ok, out / f"accuracy_vs_macs{tag}.png", dataset=d)
        plots[f"accuracy vs latency{tag}"] = plot_accuracy_vs_latency(
            ok, out / f"accuracy_vs_latency{tag}.png", dataset=d, batch=_largest_batch(ok)
        )
    if any(r["kind"] == "recipe" for r in ok):
        plots["realized speedup"] = plot_realized_speedup(ok, out / "realized_speedup.png")
        plots["per-sample MAC histograms"] = plot_mac_histograms(ok, out / "mac_histograms.png")
    if any(latency_extra(r) is not None for r in ok):
        plots["latency budget"] = plot_latency_budget(ok, out / "latency_budget.png")
    panels: list[Path] = []
    example_sets: dict[str, dict[str, Any]] = {}
    for r in sorted(ok, key=lambda r: r["job"]):
        if r["kind"] != "recipe" or r.get("seed") != min(q.get("seed", 0) for q in ok):
            continue
        same = [q for q in ok if q["recipe"] == r["recipe"] and q.get("seed") == r.get("seed")]
        if r is not _pick_budget(same):
            continue
        ex_path = out / "examples" / f"{r['dataset']}.json"
        if r["dataset"] not in example_sets and ex_path.exists():
            example_sets[r["dataset"]] = json.loads(ex_path.read_text())
        written = plot_decisions(r, example_sets.get(r["dataset"], {}), out / "decisions" / f"{r['recipe']}.png")
        if written is not None:
            panels.append(written)
    plots["example decisions"] = panels
    return plots


def _largest_batch(rows: Sequence[dict[str, Any]]) -> int:
    sizes = [
        int(k[1:-10]) for r in rows for k in r if k.startswith("b") and k.endswith("_sparse_ms") and k[1:-10].isdigit()
    ]
    return max(sizes, default=64)


def _main_dataset(rows: Sequence[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        if r["kind"] == "static":
            counts[r["dataset"]] = counts.get(r["dataset"], 0) + 1
    return max(counts, key=counts.get) if counts else (rows[0]["dataset"] if rows else "")
