"""The suite's files: ``results.csv`` / ``results.json``, ``report.md`` (verdicts and headline from
:mod:`dynnet.bench.front`) and the plots (:mod:`dynnet.bench.plots`); definitions in :mod:`dynnet.bench.front`."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynnet.bench.front import (
    BUDGET_TOLERANCE,
    TABLE_COLUMNS,
    _variant,
    aggregate,
    headline,
    on_budget,
    verdicts,
)  # fmt: skip

__all__ = ["load_rows", "write_outputs", "write_report", "write_table"]


def _headline_lines(rows: Sequence[dict[str, Any]], profile: dict[str, Any]) -> list[str]:
    table = headline(rows, profile.get("budgets", ()), profile.get("dataset"))
    if not table:
        return []
    lines = [
        "## Headline: best dynamic vs best static",
        "",
        "At each MAC level, the most accurate recipe on budget and the most accurate static baseline at or below that "
        f"fraction of the dense base's MACs (+{BUDGET_TOLERANCE}); accuracy ± 2 SE on the test images.",
        "",
        "| MACs | best dynamic | accuracy | MAC frac | best static | accuracy | MAC frac | dynamic − static |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for h in table:
        dyn, sta = h["dynamic"], h["static"]

        def cell(r: dict[str, Any] | None, se: float, name: str, dense_macs: float = h["dense_macs"]) -> str:
            if r is None:
                return "– | – | –"
            return f"{name} | {100 * r['accuracy']:.2f} ± {2 * se:.2f} % | {r['mean_macs'] / dense_macs:.3f}"

        sname = None
        if sta is not None:
            sname = {"pruned": f"pruned {sta.get('budget')}", "static": "trained"}.get(sta["recipe"], sta["recipe"])
            sname = f"{sta['model']}×{sta['width']:g} ({sname})"
        gap = h["gap"]
        within = math.isfinite(gap) and abs(gap) <= 2 * math.hypot(h["dynamic_se"], h["static_se"])
        tie = " (within 2 SE)" if within else ""
        gap_text = f"{gap:+.2f} pts" if math.isfinite(gap) else "–"
        lines.append(
            f"| {100 * h['budget']:g} % | {cell(dyn, h['dynamic_se'], dyn['recipe'] if dyn else '')} | "
            f"{cell(sta, h['static_se'], sname or '')} | {gap_text}{tie} |"
        )
    dense = table[0]["dense"]
    if dense is not None:
        lines += ["", f"Dense base: {100 * dense['accuracy']:.2f} % at {dense['mean_macs'] / 1e6:.2f} M MACs."]
    return [*lines, ""]


# ----------------------------------------------------------------------------------------------- files


def load_rows(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every ``runs/<job>.json`` of a suite folder (sorted by job id)."""
    runs = Path(out_dir) / "runs"
    return [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]


def write_table(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``results.csv`` (the flat columns) and ``results.json`` (every field of every row)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "results.csv", out / "results.json"
    columns = list(TABLE_COLUMNS)
    at = columns.index("threads")  # the timing of batch sizes other than 1 and 64 goes with theirs
    columns[at:at] = [f"b{b}_{k}" for b in _batch_sizes(rows) if b not in (1, 64) for k in _TIMED]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            flat = dict(r)
            for kind in ("macs", "executed"):
                flat.update({f"{kind}_{q}": v for q, v in (r.get(f"{kind}_q") or {}).items()})
            writer.writerow({k: _cell(flat.get(k)) for k in columns})
    slim = [{k: v for k, v in r.items() if k not in ("examples", "traceback")} for r in rows]
    json_path.write_text(json.dumps(slim, separators=(",", ":"), default=str))
    return csv_path, json_path


_TIMED = ("dense_ms", "sparse_ms", "mac_speedup", "latency_speedup", "realized_ratio")
"""The timing fields of each batch size ``b{B}_...`` in a row (:func:`dynnet.bench.harness.profile_model`)."""

SLOWER = 1.02
"""Sparse mode counts as slower than dense beyond this latency ratio (the never-slower guarantee's tolerance)."""


def _batch_sizes(rows: Sequence[dict[str, Any]]) -> list[int]:
    """The batch sizes timed in any row (from its ``b{B}_realized_ratio`` fields), ascending."""
    timed = (k for r in rows for k in r if k.startswith("b") and k.endswith("_realized_ratio"))
    return sorted({int(k[1:].split("_", 1)[0]) for k in timed})


def _speed_lines(rows: Sequence[dict[str, Any]], profile: dict[str, Any]) -> list[str]:
    """The speed profile's table: each recipe at each batch size, dense → sparse ms, MAC and latency speedups, the
    realized ratio, and whether sparse was slower than dense (beyond :data:`SLOWER`)."""
    ok = sorted((r for r in rows if r.get("status") == "ok" and r.get("kind") == "recipe"), key=lambda r: r["job"])
    sizes = _batch_sizes(ok)
    size = dict(profile.get("dataset_kwargs") or ()).get("image_size")
    lines = [
        "## Speed",
        "",
        f"`{profile.get('base')}` at {f'{size}×{size}' if size else 'the data’s image size'}, "
        f"{profile.get('threads')} thread(s); dense and sparse timed alternately ({profile.get('timing_rounds', 1)} "
        "round(s), each mode's median round). ms per image at batch 1, per batch otherwise; in brackets the engine "
        "sparse mode chose where it did not run its batch path (`batch_engine`: per_sample, or masked — the "
        "decisions as masks on the dense work). Realized = latency "
        "speedup ÷ MAC speedup (1.0: the MAC saving fully on the clock). **slower** = sparse more than "
        f"{100 * (SLOWER - 1):.0f} % slower than dense.",
        "",
        "| recipe | MAC frac | executed frac | " + " | ".join(f"b{b} ms dense→sparse | b{b} ×lat / ×MAC | b{b} realized"
                                                           for b in sizes) + " |",
        "|---|---|---|" + "---|---|---|" * len(sizes),
    ]  # fmt: skip
    slower = []
    for r in ok:
        cells = []
        for b in sizes:
            dense, sparse = r.get(f"b{b}_dense_ms"), r.get(f"b{b}_sparse_ms")
            flag = ""
            if dense and sparse and float(sparse) > SLOWER * float(dense):
                flag = " **slower**"
                slower.append(f"{r['recipe']} at batch {b}")
            engine = r.get(f"b{b}_sparse_engine")
            flag += f" ({engine})" if engine and engine != "batched" else ""
            cells.append(f"{_f(dense)}→{_f(sparse)}{flag} | ×{_f(r.get(f'b{b}_latency_speedup'))} / "
                         f"×{_f(r.get(f'b{b}_mac_speedup'))} | {_f(r.get(f'b{b}_realized_ratio'))}")  # fmt: skip
        lines.append(f"| {r['recipe']} | {_f(r.get('mac_fraction'), '.3f')} | "
                     f"{_f(r.get('executed_fraction'), '.3f')} | " + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "Sparse slower than dense: " + (", ".join(slower) if slower else "nowhere measured") + ".", ""]
    return lines


def _latency_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The latency extras' table (:mod:`dynnet.bench.latency_extras`): prediction error of the latency model, and
    each calibration to a measured latency target; then the MAC- vs latency-budget fine-tunes."""
    from dynnet.bench.latency_extras import latency_extra

    measured = [(r, latency_extra(r)) for r in sorted(rows, key=lambda r: r["job"]) if r.get("status") == "ok"]
    measured = [(r, lat) for r, lat in measured if lat is not None]
    if not measured:
        return []
    lines = [
        "## Latency model and latency budgets",
        "",
        "Held-out prediction error of the per-sample latency (median / p90), dense latency measured vs predicted, and "
        "`calibrate(budget_ms=t)` to targets t = 0.8 / 0.9 / 1.1 × the measured sparse latency: measured latency "
        "after calibration (its error) and an independent recheck (its error); ✓ within 3 %.",
        "",
        "| recipe | batch | pred. error | dense ms measured / predicted | calibrations: target → measured (err) / "
        "recheck (err) |",
        "|---|---|---|---|---|",
    ]
    for r, lat in measured:
        err = lat["prediction_error"].get(str(lat["batch"]), {})
        cals = []
        for c in lat["calibration"]:
            if "measured_ms" not in c:
                cals.append(f"{_f(c['target_ms'], '.3f')} → failed: {_short(c.get('error', ''), 60)}")
                continue
            ok = "✓" if c["rel_error"] <= 0.03 else "✗"
            cals.append(f"{_f(c['target_ms'], '.3f')} → {_f(c['measured_ms'], '.3f')} ({100 * c['rel_error']:.1f} %"
                        f" {ok}) / {_f(c['recheck_ms'], '.3f')} ({100 * c['recheck_rel_error']:.1f} %)")  # fmt: skip
        lines.append(
            f"| {r['recipe']} | {lat['batch']} | {100 * err.get('median', math.nan):.1f} % / "
            f"{100 * err.get('p90', math.nan):.1f} % | {_f(lat['dense_measured_ms'], '.3f')} / "
            f"{_f(lat['dense_predicted_ms'], '.3f')} | {'; '.join(cals)} |"
        )
    trained = [(r, lat["training"]) for r, lat in measured if lat.get("training")]
    if trained:
        lines += [
            "",
            "| recipe | budget kind | accuracy | MAC fraction | accuracy at the latency targets (measured ms) |",
            "|---|---|---|---|---|",
        ]
        for r, training in trained:
            for kind, t in training.items():
                curve = ", ".join(f"{100 * c['accuracy']:.2f} % ({_f(c['measured_ms'], '.3f')})"
                                  for c in t["curve"] if "measured_ms" in c)  # fmt: skip
                lines.append(f"| {r['recipe']} | {kind} | {100 * t['accuracy']:.2f} % | "
                             f"{_f(t['mac_fraction'], '.3f')} | {curve or '–'} |")  # fmt: skip
    return [*lines, ""]


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def _f(v: Any, fmt: str = ".2f", none: str = "–") -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return none
    return format(x, fmt) if math.isfinite(x) else none


def _recipe_line(name: str, items: list[dict[str, Any]]) -> str:
    """One plain-language verdict per recipe (over its budgets)."""
    fam = items[0].get("family", "")
    off = [v for v in items if not v.get("on_budget", True)]
    items = [v for v in items if v.get("on_budget", True)]
    off_text = ""
    if off:
        off_text = " Off budget (not counted): " + ", ".join(
            f"budget {v['budget']:g} achieved {_f(v.get('achieved', v.get('mac_fraction')))}" for v in off
        )
    if not items:
        return f"- **{name}** ({fam}): no point on budget (within {BUDGET_TOLERANCE:g}).{off_text}."
    beats = [v for v in items if v.get("beats")]
    if all(v.get("beats") is None for v in items):
        verdict = "beats the static front: **n/a** (no static baseline on its dataset)"
    elif beats:
        budgets = ", ".join(f"{v['budget']:g} ({v['gap']:+.1f} pts ± {2 * v['se']:.1f})" for v in beats)
        verdict = f"beats the static front: **yes** at budget {budgets}"
        if all(v["gap"] <= 2 * v["se"] for v in beats):
            verdict += " — within noise (gap ≤ 2 SE)"
    else:
        best = max(items, key=lambda v: v.get("gap", -math.inf))
        verdict = f"beats the static front: **no** (closest: budget {best['budget']:g}, {best['gap']:+.1f} pts)"
    ratios = []
    for b in ("b1", "b64"):
        vals = [v.get(f"{b}_realized_ratio") for v in items]
        speed = [v.get(f"{b}_mac_speedup") for v in items]
        lat = [v.get(f"{b}_latency_speedup") for v in items]
        if any(x is not None for x in vals):
            parts = ", ".join(f"{_f(r)} (×{_f(lt)} / ×{_f(s)})" for r, lt, s in zip(vals, lat, speed, strict=True))
            ratios.append(f"batch {b[1:]}: {parts}")
    real = "; ".join(ratios) if ratios else "not timed"
    if all((v.get("mac_fraction") or 0) >= 0.95 for v in items):
        verdict += " — no MAC saving in this run: its MAC fraction is ≥ 0.95 of its base at every budget"
    budgets = "/".join(f"{v['budget']:g}" for v in items)
    stale = [v for v in items if v.get("stale")]
    if stale:
        verdict += (" — **stale** at budget " + ", ".join(f"{v['budget']:g}" for v in stale)
                    + " (made with earlier settings; not in the headline until rerun)")  # fmt: skip
    return (f"- **{name}** ({fam}): {verdict}. Realized speedup ÷ MAC speedup at budgets {budgets} — {real} "
            f"(latency speedup / MAC speedup in brackets).{off_text}")  # fmt: skip


def write_report(
    rows: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    profile: dict[str, Any],
    machine: dict[str, Any],
    plots: dict[str, Path | list[Path]] | None = None,
) -> Path:
    """``report.md``: settings, machine, plots, per-recipe verdict lines, the table, the errors.

    Args:
        rows: every job row (errors included).
        out_dir: where ``report.md`` goes (plot links are relative to it).
        profile: the profile's settings (:meth:`BenchProfile.as_dict`).
        machine: :func:`~dynnet.bench.latency.machine_info`.
        plots: name → PNG path(s) written by :func:`dynnet.bench.plots.write_plots`.

    Returns:
        The report's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ver = verdicts(rows)
    agg = aggregate(rows)
    errors = [r for r in rows if r.get("status") not in ("ok", "unreachable")]
    unreachable = [r for r in rows if r.get("status") == "unreachable"]
    loads = [float(r["machine"]["loadavg_1m"]) for r in rows if isinstance(r.get("machine"), dict)]
    wall = sum(float(r.get("wall_seconds") or 0) for r in rows)
    static = sorted((r for r in agg if r["kind"] == "static"), key=lambda r: (r["dataset"], r["mean_macs"]))
    recipes = sorted({v["recipe"] for v in ver} | {r["recipe"] for r in errors if r["kind"] == "recipe"})
    p = profile
    lines = [f"# dynnet benchmark suite — profile `{p.get('name')}`", ""]
    if p.get("scrambled"):
        lines += [
            f"{len(recipes)} recipe(s) on `{p.get('base')}` (`{p.get('dataset')}` images) at budgets "
            f"{', '.join(f'{b:g}' for b in p.get('budgets', []))}, untrained"
            + (" (normalisation layers with a trained network's statistics)" if p.get("trained_like") else "")
            + f"; measured in **sparse mode** (work really skipped) on {p.get('test_subset') or 'all'} test images.",
            "",
            "> **No training: the decisions are random** (each recipe's gates scrambled to mixed decisions, then "
            "calibrated to the budget on the validation images). The accuracies are those of untrained heads and mean "
            "nothing; what this profile measures is the budget reached and the time sparse mode takes.",
            "",
            *_speed_lines(rows, p),
        ]  # fmt: skip
    else:
        lines += [
            f"{_coverage(len(recipes))} at budgets {', '.join(f'{b:g}' for b in p.get('budgets', []))} "
            f"and {len(static)} static baselines, trained with one shared schedule: base `{p.get('base')}` × "
            f"{p.get('width')} on `{p.get('dataset')}`, {p.get('subset') or 'all'} training images, "
            f"{p.get('epochs')} epoch(s), batch {p.get('batch_size')}, SGD lr {p.get('lr')} (cosine), seeds "
            f"{p.get('seeds')}; tested in **sparse mode** (work really skipped) on {p.get('test_subset') or 'all'} "
            "test images.",
            "",
        ]
    if p.get("name") == "quick":
        lines += [
            "> **Quick profile: a smoke test. The accuracies come from a very short schedule** (one epoch on a few "
            "thousand images of a tiny network). They rank methods only roughly; the gaps to the front are often "
            "within noise. Use the `standard` profile (CPU, in pieces) or `full` (GPU) for conclusions.",
            "",
        ]
    if not p.get("scrambled"):  # random decisions: no accuracy to compare
        lines += _headline_lines(rows, p)
    lines += _latency_lines(rows)
    lines += [
        "## Machine",
        "",
        f"{machine.get('date')} — {machine.get('platform')}, {machine.get('cpu_count')} CPUs, torch "
        f"{machine.get('torch')}, Python {machine.get('python')}, GPU: {machine.get('cuda') or 'none'}; latency with "
        f"{p.get('threads') or machine.get('torch_threads')} thread(s), median of repeated runs after warm-up "
        f"({p.get('min_run_time')} s of measurement per configuration, batch 1 = mean over "
        f"{p.get('batch1_samples')} different images). Load average at report time: {machine.get('loadavg_1m')} "
        f"(per-job load averages are in `results.json`"
        + (f"; they ranged {min(loads):.1f}–{max(loads):.1f}" if loads else "")
        + f"). The {len(rows)} jobs took {wall / 60:.1f} min of wall-clock time in all. "
        "**The CPU was shared with other work: timings are noisy.**",
        "",
        "## Plots",
        "",
    ]
    for name, path in (plots or {}).items():
        paths = path if isinstance(path, list) else [path]
        if not paths:
            continue
        if len(paths) == 1:
            lines.append(f"![{name}]({_rel(paths[0], out)})")
            lines.append("")
        else:
            links = ", ".join(f"[{Path(q).stem}]({_rel(q, out)})" for q in paths)
            lines.append(f"- {name}: {links}")
    lines += [
        "",
        "## Verdicts",
        "",
        "Beats the front = accuracy above the static Pareto front's linear interpolation at the same mean MACs, or "
        "dominating a baseline (see `docs/benchmarks.md`). Gaps in accuracy points with ±2 standard errors. "
        "Realized speedup ÷ MAC speedup = (dense latency / sparse latency) ÷ (dense MACs / mean MACs) against the "
        "recipe's own base network; 1.0 means the MAC saving is fully realized on the clock.",
        "",
    ]
    by_recipe: dict[str, list[dict[str, Any]]] = {}
    for v in ver:
        by_recipe.setdefault(v["recipe"], []).append(v)
    for name in recipes:
        if name in by_recipe:
            lines.append(_recipe_line(name, by_recipe[name]))
        else:
            err = next(r for r in errors if r["recipe"] == name)
            lines.append(f"- **{name}**: failed — `{_short(err.get('error', ''))}`")
    if unreachable:
        lines += ["", "Not run, budget outside the recipe's declared reachable range (the conversion refuses it): "
                  + ", ".join(f"{r['recipe']} at {r['budget']:g} ({r['error'].split('reachable ')[-1]})"
                              for r in unreachable) + "."]  # fmt: skip
    lines += ["", "## Static baselines", "",
              "| model | width | made by | dataset | accuracy | MACs (M) | b1 ms | b64 ms |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in static:
        shipped = f"shipped `{_variant(r).removeprefix('shipped-')}` (its own schedule)"
        made = {"static": "trained (suite schedule)", "shipped": shipped}.get(r["recipe"])
        if r["recipe"] == "pruned":
            made = f"pruned to {r['budget']:g} + fine-tuned"
        lines.append(
            f"| {r['model']} | {r['width']:g} | {made or r['recipe']} | {r['dataset']} | {100 * r['accuracy']:.2f} % | "
            f"{r['mean_macs'] / 1e6:.3f} | {_f(r.get('b1_sparse_ms'))} | {_f(r.get('b64_sparse_ms'))} |"
        )
    lines += [
        "",
        "## Recipes",
        "",
        "| recipe | family | budget → achieved | base | accuracy | front | gap (pts) | MACs (M) | MAC frac | "
        "executed frac | b1 ms dense→sparse | b1 ratio | b64 ms dense→sparse | b64 ratio | beats |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in ver:
        beats = {True: "yes", False: "no", None: "n/a"}[v.get("beats")] if v.get("on_budget", True) else "not counted"
        if v.get("stale"):
            beats += " (stale)"
        base = f"{v['model']}×{v['width']:g}" + (" (own)" if v.get("base_fallback") else "")
        if v.get("padded_to"):
            base += " pad " + "×".join(str(int(d)) for d in v["padded_to"])
        lines.append(
            f"| {v['recipe']} | {v.get('family', '')} | {_budget_cell(v)} | {base} | {100 * v['accuracy']:.2f} % | "
            f"{_f(100 * v['front_accuracy'])} % | {_f(v['gap'], '+.2f')} | {v['mean_macs'] / 1e6:.3f} | "
            f"{_f(v['mac_fraction'], '.3f')} | {_f(v.get('executed_fraction'), '.3f')} | "
            f"{_f(v.get('b1_dense_ms'))}→{_f(v.get('b1_sparse_ms'))} | {_f(v.get('b1_realized_ratio'))} | "
            f"{_f(v.get('b64_dense_ms'))}→{_f(v.get('b64_sparse_ms'))} | {_f(v.get('b64_realized_ratio'))} | "
            f"{beats} |"
        )
    if errors:
        lines += ["", "## Failed jobs", "", "| job | error |", "|---|---|"]
        lines += [f"| {r['job']} | `{_short(r.get('error', ''))}` |" for r in errors]
    lines += [
        "",
        "Files: `results.csv` (flat table), `results.json` (all fields: MAC quantiles and histograms, decision "
        "rates, training history, per-job machine info), `runs/<job>.json` (one per job; the suite skips finished "
        "jobs), `suite.log`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _coverage(n: int) -> str:
    """``"Every registered recipe (44)"``, or ``"7 of the 44 registered recipes (a partial run)"``."""
    import dynnet

    total = len(dynnet.list_recipes())  # imports the method packages (they register themselves)
    if n >= total:
        return f"Every registered recipe ({n})"
    return f"{n} of the {total} registered recipes (a partial run: the others are not in this report yet)"


def _budget_cell(v: dict[str, Any]) -> str:
    """``0.5 → 0.49`` (``0.5 → 0.76 **off budget**`` beyond the tolerance)."""
    achieved = v.get("achieved", v.get("mac_fraction"))
    cell = f"{v['budget']:g} → {_f(achieved)}"
    return cell if v.get("on_budget", on_budget(v.get("budget"), achieved)) else cell + " **off budget**"


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|").replace("`", "'")
    return text if len(text) <= n else text[: n - 1] + "…"


def _rel(path: Path | str, base: Path) -> str:
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def write_outputs(
    rows: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    profile: dict[str, Any],
    machine: dict[str, Any],
) -> Path:
    """Table, plots and report of a suite folder; returns the report's path.

    Raises:
        SystemExit: matplotlib (the ``bench`` extra) is not installed; nothing is written.
    """
    try:
        from dynnet.bench.plots import write_plots
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        raise SystemExit("dynnet bench draws its plots with matplotlib: pip install 'dynnet[bench]'") from None

    out = Path(out_dir)
    write_table(rows, out)
    plots = write_plots(rows, out)
    (out / "machine.json").write_text(json.dumps(machine, indent=1, default=str))
    return write_report(rows, out, profile=profile, machine=machine, plots=plots)
