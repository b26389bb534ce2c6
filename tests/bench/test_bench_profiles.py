"""The family profiles of `dynnet bench` (which recipes each plans), the budget check (no training), the profile
extras and the recipes' own measurements (``RecipeSpec.bench_metrics``), each on a tiny synthetic run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dynnet.bench.extras import EXTRAS
from dynnet.bench.plan import PROFILES, BenchProfile, plan_jobs
from dynnet.bench.suite import run_suite
from dynnet.core import RECIPES

TINY = BenchProfile(
    name="tiny",
    base="cifar_resnet8",
    width=0.25,
    dataset="synthetic",
    dataset_kwargs=(("in_channels", 1), ("image_size", 16), ("num_train", 64), ("num_test", 24)),
    subset=48,
    val_fraction=0.25,
    test_subset=16,
    epochs=1,
    max_steps=2,
    batch_size=16,
    budgets=(0.5,),
    static_depths=(),
    static_widths=(),
    batch_sizes=(1,),
    min_run_time=0.001,
    batch1_samples=2,
    threads=1,
    train_threads=1,
    examples=0,
)


@pytest.mark.parametrize(
    ("name", "families", "extra"),
    [
        ("layer_skip", {"layer_skip", "recursion"}, set()),
        ("early_exit", {"early_exit"}, set()),
        ("channel", {"channel"}, set()),
        ("spatial", {"spatial", "block"}, set()),
        ("glimpse", {"glimpse", "resolution", "moe"}, {"dt_ram"}),
        ("convnet_aig", set(), {"convnet_aig"}),
    ],
)
def test_a_family_profile_plans_its_familys_recipes(name: str, families: set[str], extra: set[str]) -> None:
    profile = PROFILES[name]
    jobs = plan_jobs(profile)
    planned = {j.recipe for j in jobs if j.kind == "recipe"}
    import dynnet

    wanted = {n for n in dynnet.list_recipes() if RECIPES.get(n).family in families} | extra
    assert planned == wanted
    budgets = {j.budget for j in jobs if j.kind == "recipe"}
    assert budgets <= set(profile.budgets) | {profile.trained_budget}


def test_the_glimpse_profile_sends_moe_to_plain_images_with_a_static_front_there() -> None:
    jobs = plan_jobs(PROFILES["glimpse"])
    moe = {j.dataset for j in jobs if j.recipe in ("sparse_moe", "hydranets")}
    glimpse = {j.dataset for j in jobs if j.recipe in ("ram", "gfnet")}
    static = {j.dataset for j in jobs if j.kind == "static"}
    assert moe == {"fashion_mnist"} and glimpse == {"cluttered_fashion_mnist"}
    assert static == {"fashion_mnist", "cluttered_fashion_mnist"}


def test_the_budget_check_plans_every_recipe_untrained_at_its_budgets() -> None:
    profile = PROFILES["budget"]
    jobs = plan_jobs(profile)
    assert profile.scrambled and profile.batch_sizes == ()
    assert {j.recipe for j in jobs} == set(RECIPES.names()) and len(jobs) == 2 * len(RECIPES.names())
    assert all(j.kind == "recipe" and j.trained_budget is None and j.budget in (0.5, 0.75) for j in jobs)


def test_settings_name_extras_and_scrambling_only_when_set() -> None:
    job = plan_jobs(TINY, ["convnet_aig"])[0]
    assert "extras" not in job.settings(TINY) and "scrambled" not in job.settings(TINY)
    with_extras = dataclasses.replace(TINY, extras=("scrambled_timing",), scrambled=True)
    assert job.settings(with_extras)["extras"] == ["scrambled_timing"] and job.settings(with_extras)["scrambled"]
    assert job.settings(with_extras) != job.settings(TINY)  # a changed measurement reruns the job


def test_profiles_refuse_unknown_extras_and_a_trained_budget_check() -> None:
    assert {"scrambled_timing", "engine_ratio", "operator_profile"} <= set(EXTRAS)
    with pytest.raises(ValueError, match="unknown extras"):
        dataclasses.replace(TINY, extras=("no_such_extra",))
    with pytest.raises(ValueError, match="trains nothing"):
        dataclasses.replace(TINY, scrambled=True, trained_budget=0.5)


def test_the_budget_check_calibrates_random_decisions_without_training(tmp_path: Path) -> None:
    profile = dataclasses.replace(TINY, name="budget", scrambled=True, batch_sizes=())
    (row,) = run_suite(profile, tmp_path, ["convnet_aig"], progress=False)
    assert row["status"] == "ok", row.get("error")
    assert row["history"] == [] and "calibrate" in row["seconds"] and row["scrambled"]["mixed"]
    assert row["calibration"]["calibrated"] and row["achieved_val"] == pytest.approx(0.5, abs=0.05)
    assert 0.0 < row["achieved"] <= 1.0 and isinstance(row["on_budget"], bool)
    assert (tmp_path / "report.md").exists()


def test_profile_extras_land_in_the_row(tmp_path: Path) -> None:
    profile = dataclasses.replace(TINY, extras=("scrambled_timing", "engine_ratio", "operator_profile"))
    (row,) = run_suite(profile, tmp_path, ["convnet_aig"], progress=False, report=False)
    assert row["status"] == "ok", row.get("error")
    extras = row["extras"]
    assert extras["scrambled_timing"]["changed"] > 0 and extras["scrambled_timing"]["b1_sparse_ms"] > 0
    assert extras["engine_ratio"]["b1_engine_dense_ms"] > 0 and extras["engine_ratio"]["b1_engine_ratio"] > 0
    ops = extras["operator_profile"]
    assert set(ops) == {"b1_dense", "b1_sparse"} and ops["b1_dense"][0]["self_cpu_ms"] >= 0


def test_recipe_metrics_of_exits_and_experts_land_in_the_row(tmp_path: Path) -> None:
    rows = run_suite(TINY, tmp_path, ["branchynet", "sparse_moe"], progress=False, report=False)
    by_recipe = {r["recipe"]: r for r in rows}
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("error") for r in rows]
    exits = by_recipe["branchynet"]["recipe_metrics"]
    assert len(exits["anytime"]) >= 2 and exits["anytime"][-1]["mac_fraction"] > exits["anytime"][0]["mac_fraction"]
    points = exits["operating_points"]
    assert points and all(0.0 <= p["test_accuracy"] <= 1.0 and len(p["exit_rates"]) == len(exits["anytime"])
                          for p in points)  # fmt: skip
    moe = by_recipe["sparse_moe"]["recipe_metrics"]
    assert moe["expert_load"] and 0.0 < moe["max_share"] <= 1.0
    for block, shares in moe["expert_load"].items():  # shares of the routed pairs (none: every sample skipped)
        assert sum(shares) == pytest.approx(1.0 if moe["routed"][block] else 0.0, abs=1e-3)
    assert sum(moe["routed"].values()) > 0
    assert "recipe_metrics" not in by_recipe["sparse_moe"]["settings"]


def test_without_matplotlib_the_report_says_which_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from dynnet.bench.report import write_outputs

    monkeypatch.delitem(sys.modules, "dynnet.bench.plots", raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"pip install 'dynnet\[bench\]'"):
        write_outputs([], tmp_path, profile={}, machine={})
    assert not any(tmp_path.iterdir())  # nothing half-written
