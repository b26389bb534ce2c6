"""How the suite judges its points: static Pareto front, "beats the front", on budget, standard errors, headline.

Definitions (also in ``docs/benchmarks.md``):

- **Static Pareto front**: among the static baselines of a dataset, the points (mean MACs per image ``m``,
  top-1 accuracy ``a``) that no other baseline dominates (no other has ``m' <= m`` and ``a' >= a`` with one
  strict). Sorted by MACs, their accuracy strictly increases.
- **Front accuracy** ``F(m)``: linear interpolation of the front in MACs between consecutive front points;
  ``F(m) = a_0`` below the cheapest front point and ``F(m) = a_k`` above the most expensive one.
- **Beats the front**: ``a > F(m)``, or the point dominates a baseline (``m <= m_i``, ``a >= a_i``, one strict).
  The gap ``a - F(m)`` is reported in accuracy points with the binomial standard error of ``a``
  (``sqrt(a (1 - a) / n)`` over ``n`` test images) so that a gap inside ±2 SE reads as a tie.
- **On budget**: a recipe point whose achieved mean MAC fraction on the test split is within
  :data:`BUDGET_TOLERANCE` (0.03) of its budget. A point off budget is marked in the report and never counted as
  a point at that budget (no "beats the front at budget b" for it).
- **Realized-speedup ratio** at batch ``B``: (dense latency / sparse latency) ÷ (dense MACs / mean MACs), where
  "dense" is the recipe's own base network running statically: 1.0 means every MAC saved was saved on the clock.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BUDGET_TOLERANCE", "TABLE_COLUMNS", "Point", "aggregate", "beats_front", "front_accuracy", "headline",
    "on_budget", "pareto_front", "standard_error", "verdicts",
]  # fmt: skip

TABLE_COLUMNS = (
    "job", "kind", "recipe", "family", "model", "width", "depth", "budget", "achieved", "achieved_val", "on_budget",
    "stale", "seed", "dataset", "status", "accuracy", "test_images", "mean_macs", "mean_executed_macs", "dense_macs",
    "mac_fraction", "executed_fraction", "mean_macs_correct", "mean_macs_incorrect", "confidence_mac_corr", "params",
    "base_fallback", "padded_to",
    "b1_dense_ms", "b1_sparse_ms", "b1_mac_speedup", "b1_latency_speedup", "b1_realized_ratio",
    "b64_dense_ms", "b64_sparse_ms", "b64_mac_speedup", "b64_latency_speedup", "b64_realized_ratio",
    "threads", "device", "error",
    *(f"{kind}_{q}" for kind in ("macs", "executed") for q in ("min", "p10", "p50", "p90", "max", "std")),
)  # fmt: skip
"""Columns of ``results.csv`` (``results.json`` holds every field, distributions and examples included)."""

Point = tuple[float, float]

BUDGET_TOLERANCE = 0.03
"""How far (in MAC fraction) a point's achieved MACs may be from its budget and still count as a point at it."""


def on_budget(budget: float | None, achieved: float | None, tolerance: float = BUDGET_TOLERANCE) -> bool:
    """Whether a point with target ``budget`` and achieved MAC fraction ``achieved`` counts at its budget
    (``True`` without a budget: static baselines)."""
    if budget is None:
        return True
    if achieved is None or not math.isfinite(float(achieved)):
        return False
    return abs(float(achieved) - float(budget)) <= tolerance + 1e-12


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The non-dominated ``(macs, accuracy)`` points, by increasing MACs (and strictly increasing accuracy).

    Args:
        points: ``(macs, accuracy)`` pairs; NaNs are ignored.

    Returns:
        The front, cheapest first. Empty for no (finite) point.
    """
    finite = [(float(m), float(a)) for m, a in points if math.isfinite(m) and math.isfinite(a)]
    front: list[Point] = []
    best = -math.inf
    for m, a in sorted(finite, key=lambda p: (p[0], -p[1])):
        if a > best:
            front.append((m, a))
            best = a
    return front


def front_accuracy(front: Sequence[Point], macs: float) -> float:
    """``F(m)``: the front's accuracy at ``macs`` (linear in MACs between front points, flat outside).

    Raises:
        ValueError: empty front.
    """
    if not front:
        raise ValueError("empty Pareto front")
    if macs <= front[0][0]:
        return front[0][1]
    for (m0, a0), (m1, a1) in itertools.pairwise(front):
        if macs <= m1:
            return a0 + (a1 - a0) * (macs - m0) / (m1 - m0)
    return front[-1][1]


def beats_front(point: Point, baselines: Sequence[Point]) -> bool:
    """Whether ``(macs, accuracy)`` lies above the static front's interpolation or dominates a baseline."""
    m, a = point
    front = pareto_front(baselines)
    if not front or not (math.isfinite(m) and math.isfinite(a)):
        return False
    dominates = any(m <= bm and a >= ba and (m < bm or a > ba) for bm, ba in front)
    return dominates or a > front_accuracy(front, m)


def _ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def _mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else math.nan


def _variant(r: dict[str, Any]) -> str:
    """The job's name without its seed: two shipped networks of one model and width (the base and its pruned
    copy) are two baselines, not two seeds of one."""
    return re.sub(r"-s\d+$", "", str(r.get("job", "")))


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over seeds of each (recipe, budget, model, width, dataset, job name without its seed): accuracy (with
    its std), MACs, latencies.

    Returns:
        One dict per group with the numeric fields of :data:`TABLE_COLUMNS` averaged, ``seeds`` (how many) and
        ``accuracy_std``; errored jobs are left out.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in _ok(rows):
        key = (r["kind"], r["recipe"], r.get("budget"), r["model"], r.get("width"), r.get("depth"), r["dataset"],
               _variant(r))  # fmt: skip
        groups.setdefault(key, []).append(r)
    out = []
    for members in groups.values():
        first = dict(members[0])
        for k in TABLE_COLUMNS:
            if k in ("seed", "width", "depth", "budget", "params"):
                continue
            if isinstance(first.get(k), (int, float)) and not isinstance(first.get(k), bool):
                first[k] = _mean([m.get(k, math.nan) for m in members])
        first["stale"] = any(m.get("stale") for m in members)
        first["on_budget"] = all(on_budget(m.get("budget"), m.get("achieved", m.get("mac_fraction"))) for m in members)
        accs = [m["accuracy"] for m in members]
        mu = _mean(accs)
        first["seeds"] = len(members)
        first["accuracy_std"] = math.sqrt(sum((a - mu) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0
        out.append(first)
    return out


def verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each aggregated recipe point against the static front of its dataset.

    Returns:
        One dict per (recipe, budget): the aggregated row plus ``front_accuracy``, ``gap`` (points of accuracy),
        ``se`` (binomial standard error, points), ``beats`` (bool or ``None`` without a front).
    """
    agg = aggregate(rows)
    fronts: dict[str, list[Point]] = {}
    for r in agg:
        if r["kind"] == "static":
            fronts.setdefault(r["dataset"], []).append((r["mean_macs"], r["accuracy"]))
    out = []
    for r in agg:
        if r["kind"] != "recipe":
            continue
        v = dict(r)
        base = fronts.get(r["dataset"], [])
        front = pareto_front(base)
        if front:
            fa = front_accuracy(front, r["mean_macs"])
            a = r["accuracy"]
            v.update(front_accuracy=fa, gap=100 * (a - fa), se=standard_error(a, _test_count(r)),
                     beats=beats_front((r["mean_macs"], a), base))  # fmt: skip
        else:
            v.update(front_accuracy=math.nan, gap=math.nan, se=math.nan, beats=None)
        out.append(v)
    return sorted(out, key=lambda v: (v["recipe"], v.get("budget") or 0))


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy over ``n`` test images, in points."""
    return 100 * math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(1, n))


def _test_count(r: dict[str, Any]) -> int:
    """Test images behind an aggregated row's accuracy (over its seeds)."""
    return max(1, int(r.get("test_images") or 1) * int(r.get("seeds") or 1))


def headline(rows: Sequence[dict[str, Any]], budgets: Sequence[float], dataset: str | None = None) -> list[dict]:
    """Best dynamic vs best static at each MAC level: the report's headline table.

    At level ``b`` both sides spend at most ``b + BUDGET_TOLERANCE`` of the dense base's MACs (the base the recipes
    converted: the median ``mean_macs / mac_fraction`` of their rows): the dynamic candidates are the recipe points at
    budget ``b`` that are on budget (a recipe on its own, larger base is left out when it spends more), the static
    candidates every baseline. Means over seeds (:func:`aggregate`). Recipe rows marked ``stale`` (made with settings
    the profile no longer uses) are left out.

    Returns:
        One dict per level: ``budget``, ``dynamic`` and ``static`` (the best aggregated rows, or ``None``), their
        accuracy standard errors ``dynamic_se`` / ``static_se`` (points), ``gap`` (dynamic minus static, points),
        ``dense`` (the dense base's row when a static baseline spends its MACs, else ``None``), ``dense_macs``.
    """
    agg = [r for r in aggregate(rows) if dataset is None or r["dataset"] == dataset]
    recipes = [r for r in agg if r["kind"] == "recipe" and r.get("on_budget", True) and not r.get("stale")]
    dense_refs = [r["mean_macs"] / r["mac_fraction"] for r in recipes if r.get("mac_fraction") and not
                  r.get("base_fallback")]  # fmt: skip
    if not dense_refs:
        return []
    dense_macs = sorted(dense_refs)[len(dense_refs) // 2]
    statics = [r for r in agg if r["kind"] == "static"]
    dense = max((r for r in statics if abs(r["mean_macs"] / dense_macs - 1) < 1e-3), key=lambda r: r["accuracy"],
                default=None)  # fmt: skip

    out = []
    for b in budgets:
        cap = (b + BUDGET_TOLERANCE) * dense_macs
        level = [r for r in recipes if r.get("budget") == b and r["mean_macs"] <= cap]
        dyn = max(level, key=lambda r: r["accuracy"], default=None)
        sta = max((r for r in statics if r["mean_macs"] <= cap), key=lambda r: r["accuracy"], default=None)
        out.append({
            "budget": b, "dynamic": dyn, "static": sta, "dense": dense, "dense_macs": dense_macs,
            "dynamic_se": standard_error(dyn["accuracy"], _test_count(dyn)) if dyn else math.nan,
            "static_se": standard_error(sta["accuracy"], _test_count(sta)) if sta else math.nan,
            "gap": 100 * (dyn["accuracy"] - sta["accuracy"]) if dyn and sta else math.nan,
        })  # fmt: skip
    return out
