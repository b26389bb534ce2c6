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


@pytest.mark.parametrize("name", ["speed_resnet50", "speed_mobilenet_v2", "speed_resnet18", "latency_resnet18"])
def test_the_speed_profiles_time_deployed_networks_untrained_without_a_static_front(name: str) -> None:
    profile = PROFILES[name]
    jobs = plan_jobs(profile)
    assert profile.scrambled and profile.trained_like and profile.timing_rounds >= 3
    assert profile.base in ("resnet50", "mobilenet_v2", "resnet18")
    assert dict(profile.dataset_kwargs)["image_size"] == 224
    assert jobs and all(j.kind == "recipe" and j.model == profile.base and j.trained_budget is None for j in jobs)
    assert {RECIPES.get(j.recipe).family for j in jobs} >= {"layer_skip", "channel", "spatial"}


def test_the_latency_profile_fine_tunes_one_recipe_per_family_and_measures_latency_budgets() -> None:
    profile = PROFILES["latency"]
    recipes = {j.recipe: j for j in plan_jobs(profile) if j.kind == "recipe"}
    assert {RECIPES.get(r).family for r in recipes} == {"layer_skip", "channel", "spatial"}
    # recipes whose objective calls the trace's budget loss: a latency budget weights their blocks by cost
    assert set(recipes) == {"skipnet", "batch_shaping", "sact"}
    assert profile.extras == ("latency_budget",) and profile.init == "zoo" and not profile.scrambled
    assert PROFILES["latency_resnet18"].extras == ("latency_model",)


def test_trained_like_statistics_need_a_scrambled_profile_and_are_in_the_settings() -> None:
    with pytest.raises(ValueError, match="set scrambled too"):
        dataclasses.replace(TINY, trained_like=True)
    with pytest.raises(ValueError, match="timing_rounds"):
        dataclasses.replace(TINY, timing_rounds=0)
    job = plan_jobs(TINY, ["convnet_aig"])[0]
    assert "trained_like" not in job.settings(TINY) and "timing_rounds" not in job.settings(TINY)
    speed = dataclasses.replace(TINY, scrambled=True, trained_like=True, timing_rounds=2)
    assert job.settings(speed)["trained_like"] and job.settings(speed)["timing_rounds"] == 2


SPEED_TINY = dataclasses.replace(
    TINY, name="speed_tiny", base="resnet18", width=1.0, scrambled=True, trained_like=True, timing_rounds=2,
    dataset_kwargs=(("in_channels", 3), ("image_size", 32), ("num_train", 64), ("num_test", 24)), batch_sizes=(1, 2),
)  # fmt: skip


def test_a_speed_profile_times_the_deployed_network_itself_at_every_batch_size(tmp_path: Path) -> None:
    import torch

    (row,) = run_suite(SPEED_TINY, tmp_path, ["convnet_aig"], progress=False)
    assert row["status"] == "ok", row.get("error")
    assert row["model"] == "resnet18" and not row["base_fallback"] and row["scrambled"]["mixed"]
    assert row["history"] == [] and row["calibration"]["calibrated"]
    for b in (1, 2):
        assert row[f"b{b}_dense_ms"] > 0 and row[f"b{b}_sparse_ms"] > 0 and row[f"b{b}_realized_ratio"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "## Speed" in report and "b2 realized" in report and "No training: the decisions are random" in report
    assert "## Headline" not in report  # random heads: no accuracy comparison
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert "b2_realized_ratio" in header and header.index("b2_dense_ms") < header.index("threads")
    # the base's normalisation layers are those of a trained network, not PyTorch's defaults
    from dynnet.bench.jobs import build_job_model, load_data

    data = load_data(SPEED_TINY, "synthetic", 0)
    model, base, _, _ = build_job_model(plan_jobs(SPEED_TINY, ["convnet_aig"])[0], SPEED_TINY, data.info)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert base == "resnet18" and norms and all(not torch.all(m.running_var == 1) for m in norms)


def test_a_speed_profile_records_a_refusal_instead_of_timing_another_network(tmp_path: Path) -> None:
    profile = dataclasses.replace(SPEED_TINY, base="mobilenet_v2")
    (row,) = run_suite(profile, tmp_path, ["perforated_cnn"], progress=False, report=False)  # dense kernels only
    assert row["status"] == "error" and "mobilenet_v2" in row["error"] and "cifar_resnet" not in row["error"]


def test_the_latency_extras_measure_the_model_calibrate_to_milliseconds_and_compare_budgets(tmp_path: Path) -> None:
    profile = dataclasses.replace(TINY, extras=("latency_budget",))
    (row,) = run_suite(profile, tmp_path, ["convnet_aig"], progress=False)
    assert row["status"] == "ok", row.get("error")
    lat = row["extras"]["latency_budget"]
    assert lat["dense_measured_ms"] > 0 and lat["sparse_measured_ms"] > 0 and lat["dense_predicted_ms"] > 0
    assert lat["prediction_error"]["1"]["median"] >= 0
    assert len(lat["calibration"]) == 3 and all("target_ms" in c for c in lat["calibration"])
    assert lat["blocks"] and all(0.0 <= b["kept"] <= 1.0 for b in lat["blocks"])
    assert set(lat["training"]) == {"mac", "latency"}
    assert all(0.0 <= t["accuracy"] <= 1.0 and len(t["curve"]) == 3 for t in lat["training"].values())
    report = (tmp_path / "report.md").read_text()
    assert "## Latency model and latency budgets" in report and "| convnet_aig | 1 |" in report
    assert "(latency_budget.png)" in report and (tmp_path / "latency_budget.png").stat().st_size > 0


def test_a_recipe_trained_from_scratch_gets_its_own_optimiser_and_the_settings_say_so() -> None:
    from dynnet.bench.jobs import _fine_tune_plan, build_job_model, load_data

    profile = PROFILES["standard"]
    jobs = {j.recipe: j for j in plan_jobs(profile, ["ram", "fbs"]) if j.kind == "recipe" and j.budget == 0.5}
    assert jobs["ram"].settings(profile)["scratch"] == RECIPES.get("ram").scratch
    assert RECIPES.get("ram").scratch["optimizer"] == "adamw" and RECIPES.get("dt_ram").scratch
    assert "scratch" not in jobs["fbs"].settings(profile)  # the other recipes' rows stay current
    data = load_data(TINY, "synthetic", 0)
    job = plan_jobs(TINY, ["ram"])[0]
    model, base, width, _ = build_job_model(job, TINY, data.info)
    init, teacher, overrides = _fine_tune_plan(job, TINY, model, base, width, data.info)
    assert init is None and teacher is None and overrides == RECIPES.get("ram").scratch
