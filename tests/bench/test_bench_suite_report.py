"""The suite's verdict logic on hand-made points: Pareto front, front interpolation, "beats the front", report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dynnet.bench.front import aggregate, beats_front, front_accuracy, pareto_front, verdicts
from dynnet.bench.report import write_report

BASELINES = [(1.0, 0.70), (2.0, 0.80), (4.0, 0.85), (3.0, 0.78), (4.0, 0.84), (5.0, 0.85)]


def test_pareto_front_keeps_only_non_dominated_points_in_mac_order() -> None:
    # (3, .78) is dominated by (2, .80); (4, .84) by (4, .85); (5, .85) by (4, .85) (same accuracy, more MACs).
    assert pareto_front(BASELINES) == [(1.0, 0.70), (2.0, 0.80), (4.0, 0.85)]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, math.nan), (2.0, 0.5)]) == [(2.0, 0.5)]


def test_front_accuracy_interpolates_linearly_and_is_flat_outside() -> None:
    front = pareto_front(BASELINES)
    assert front_accuracy(front, 1.5) == pytest.approx(0.75)
    assert front_accuracy(front, 3.0) == pytest.approx(0.825)
    assert front_accuracy(front, 2.0) == pytest.approx(0.80)
    assert front_accuracy(front, 0.5) == pytest.approx(0.70)  # cheaper than every baseline: the cheapest one's
    assert front_accuracy(front, 10.0) == pytest.approx(0.85)  # dearer than every baseline: the best one's
    with pytest.raises(ValueError, match="empty"):
        front_accuracy([], 1.0)


@pytest.mark.parametrize(
    ("point", "expected"),
    [
        ((3.0, 0.83), True),  # above the interpolation (0.825) between two front points
        ((3.0, 0.82), False),  # below it
        ((0.5, 0.70), True),  # dominates the cheapest baseline (fewer MACs, same accuracy)
        ((0.5, 0.69), False),  # cheaper and worse than everything: not a win
        ((2.0, 0.80), False),  # ties a baseline exactly
        ((6.0, 0.86), True),  # dearer than everything but more accurate than the best
        ((6.0, 0.85), False),
    ],
)
def test_beats_front(point: tuple[float, float], expected: bool) -> None:
    assert beats_front(point, BASELINES) is expected


def _row(kind: str, recipe: str, macs: float, acc: float, *, budget: float | None = None, seed: int = 0) -> dict:
    return {
        "job": f"{recipe}-{macs}-b{budget}-s{seed}", "kind": kind, "recipe": recipe, "family": "x", "model": "m",
        "width": macs + acc if kind == "static" else 1.0, "depth": 8, "budget": budget, "seed": seed,
        "dataset": "d", "status": "ok",
        "accuracy": acc, "mean_macs": macs, "test_images": 1000,
        "mac_fraction": macs / 4.0 if budget is None else budget,
        "b1_realized_ratio": 0.5, "b1_mac_speedup": 2.0, "b1_latency_speedup": 1.0,
        "b64_realized_ratio": 0.8, "b64_mac_speedup": 2.0, "b64_latency_speedup": 1.6,
    }  # fmt: skip


def test_aggregate_averages_seeds_and_verdicts_use_the_front_of_the_same_dataset() -> None:
    rows = [_row("static", "static", m, a) for m, a in BASELINES]
    rows += [_row("recipe", "good", 3.0, 0.84, budget=0.5, seed=0), _row("recipe", "good", 3.0, 0.86, budget=0.5,
             seed=1), _row("recipe", "bad", 3.0, 0.70, budget=0.5)]  # fmt: skip
    agg = [r for r in aggregate(rows) if r["recipe"] == "good"]
    assert len(agg) == 1 and agg[0]["seeds"] == 2
    assert agg[0]["accuracy"] == pytest.approx(0.85)
    assert agg[0]["accuracy_std"] == pytest.approx(math.sqrt(2) * 0.01)
    v = {x["recipe"]: x for x in verdicts(rows)}
    assert v["good"]["beats"] is True and v["good"]["gap"] == pytest.approx(2.5)
    assert v["good"]["se"] == pytest.approx(100 * math.sqrt(0.85 * 0.15 / 2000))
    assert v["bad"]["beats"] is False and v["bad"]["gap"] == pytest.approx(-12.5)
    other = dict(_row("recipe", "elsewhere", 3.0, 0.9, budget=0.5), dataset="other")
    assert {x["recipe"]: x for x in verdicts([*rows, other])}["elsewhere"]["beats"] is None


def test_aggregate_keeps_two_shipped_networks_of_one_model_and_width_apart() -> None:
    """The shipped base and its shipped pruned copy share model and width: two baselines, not two seeds of one."""
    dense = dict(_row("static", "shipped", 4.0, 0.94), width=1.0, job="shipped-m-d")
    pruned = dict(_row("static", "shipped", 2.0, 0.93), width=1.0, job="shipped-mp0.5-d")
    agg = sorted(aggregate([dense, pruned]), key=lambda r: r["mean_macs"])
    assert [(r["mean_macs"], r["accuracy"], r["seeds"]) for r in agg] == [(2.0, 0.93, 1), (4.0, 0.94, 1)]


def test_report_states_a_verdict_per_recipe_and_lists_failures(tmp_path: Path) -> None:
    rows = [_row("static", "static", m, a) for m, a in BASELINES]
    rows += [_row("recipe", "good", 3.0, 0.84, budget=0.5), _row("recipe", "bad", 3.0, 0.70, budget=0.5)]
    rows.append({"job": "broken-b0.5-s0", "kind": "recipe", "recipe": "broken", "budget": 0.5, "status": "error",
                 "error": "RuntimeError: boom", "dataset": "d", "model": "m", "seed": 0})  # fmt: skip
    path = write_report(rows, tmp_path, profile={"name": "quick", "budgets": [0.5]}, machine={"loadavg_1m": 3.2})
    text = path.read_text()
    assert "- **good** (x): beats the static front: **yes** at budget 0.5 (+1.5 pts" in text
    assert "- **bad** (x): beats the static front: **no**" in text
    assert "batch 1: 0.50 (×1.00 / ×2.00)" in text and "batch 64: 0.80" in text
    assert "- **broken**: failed — `RuntimeError: boom`" in text
    assert "very short schedule" in text and "3.2" in text


def test_a_point_off_its_budget_is_marked_and_not_counted(tmp_path: Path) -> None:
    rows = [_row("static", "static", m, a) for m, a in BASELINES]
    on = _row("recipe", "mixed", 3.0, 0.84, budget=0.5)
    off = dict(_row("recipe", "mixed", 3.0, 0.90, budget=0.25), mac_fraction=0.76, achieved=0.76)
    v = {x["budget"]: x for x in verdicts([*rows, on, off])}
    assert v[0.5]["on_budget"] is True and v[0.25]["on_budget"] is False
    text = write_report(
        [*rows, on, off], tmp_path, profile={"name": "quick", "budgets": [0.25, 0.5]}, machine={}
    ).read_text()
    assert "0.25 → 0.76 **off budget**" in text and "0.5 → 0.50 |" in text
    line = next(t for t in text.splitlines() if t.startswith("- **mixed**"))
    assert "at budget 0.5 (" in line and "at budget 0.25" not in line
    assert "Off budget (not counted): budget 0.25 achieved 0.76" in line


def test_headline_pairs_the_best_dynamic_and_static_point_at_each_mac_level(tmp_path: Path) -> None:
    from dynnet.bench.front import headline

    dense = 4.0  # the recipes' base: mean_macs / mac_fraction
    rows = [
        _row("static", "static", 4.0, 0.90),
        _row("static", "pruned", 2.0, 0.86, budget=0.5),
        _row("static", "static", 1.1, 0.80),
    ]
    rows += [
        _row("recipe", "a", 2.0, 0.88, budget=0.5), _row("recipe", "b", 2.0, 0.87, budget=0.5),
        _row("recipe", "a", 1.0, 0.70, budget=0.25),
        dict(_row("recipe", "c", 1.0, 0.99, budget=0.25), mac_fraction=0.6, achieved=0.6),  # off budget: not counted
        dict(_row("recipe", "d", 3.0, 0.98, budget=0.5), base_fallback=True),  # own larger base: too many MACs
    ]  # fmt: skip
    table = {h["budget"]: h for h in headline(rows, [0.25, 0.5, 0.75], "d")}
    assert table[0.5]["dense_macs"] == dense and table[0.5]["dense"]["accuracy"] == 0.90
    assert table[0.5]["dynamic"]["recipe"] == "a" and table[0.5]["static"]["mean_macs"] == 2.0
    assert table[0.5]["gap"] == pytest.approx(2.0)
    assert table[0.5]["dynamic_se"] == pytest.approx(100 * math.sqrt(0.88 * 0.12 / 1000))
    # at 25 %: the static network at 1.1 M MACs (0.275 of the dense base) is within the tolerance
    assert table[0.25]["dynamic"]["recipe"] == "a" and table[0.25]["static"]["mean_macs"] == 1.1
    assert table[0.25]["gap"] == pytest.approx(-10.0)
    assert table[0.75]["dynamic"] is None and math.isnan(table[0.75]["gap"])
    text = write_report(rows, tmp_path, profile={"name": "standard", "budgets": [0.25, 0.5, 0.75], "dataset": "d"},
                        machine={}).read_text()  # fmt: skip
    assert "## Headline: best dynamic vs best static" in text
    assert "| 50 % | a | 88.00 ± 2.06 % | 0.500 | m×2.86 (pruned 0.5) | 86.00 ± 2.19 % | 0.500 |" in text
    assert "| +2.00 pts (within 2 SE) |" in text and "| -10.00 pts |" in text and "| 0.500 | – |" in text
    # a stale row (made with settings the profile no longer uses) leaves the headline and is marked in the report
    rows[3]["stale"] = True
    table = {h["budget"]: h for h in headline(rows, [0.25, 0.5, 0.75], "d")}
    assert table[0.5]["dynamic"]["recipe"] == "b"
    text = write_report(rows, tmp_path, profile={"name": "standard", "budgets": [0.25, 0.5, 0.75], "dataset": "d"},
                        machine={}).read_text()  # fmt: skip
    assert "| 50 % | b |" in text and "**stale** at budget 0.5" in text and "(stale) |" in text
