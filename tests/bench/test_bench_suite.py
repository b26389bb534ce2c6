"""`run_suite`: a tiny synthetic profile end to end, resumability, failing jobs, job planning, profiles."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import torch

import dynnet.bench.jobs as jobs
import dynnet.bench.suite as suite
from dynnet.bench.jobs import record_examples
from dynnet.bench.plan import PROFILES, BenchProfile, plan_jobs
from dynnet.bench.suite import run_suite

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = BenchProfile(
    name="tiny",
    base="cifar_resnet8",
    width=0.25,
    dataset="synthetic",
    dataset_kwargs=(("in_channels", 1), ("image_size", 12), ("num_train", 96), ("num_test", 40)),
    subset=64,
    val_fraction=0.1,
    test_subset=24,
    epochs=1,
    batch_size=32,
    budgets=(0.5,),
    static_depths=(8,),
    static_widths=(0.25,),
    batch_sizes=(1, 4),
    min_run_time=0.001,
    batch1_samples=2,
    threads=1,
    train_threads=1,
    examples=3,
)
RECIPES = ("convnet_aig", "dynconv")


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert matplotlib.image.imread(path).ndim == 3  # decodes


def test_suite_end_to_end_then_resumes_without_recomputing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = suite.run_job

    def counting(job, *args, **kwargs):
        calls.append(job.id)
        return real(job, *args, **kwargs)

    monkeypatch.setattr(suite, "run_job", counting)
    rows = run_suite(TINY, tmp_path, RECIPES, progress=False)
    assert calls == ["static-d8-w0.25-s0", "convnet_aig-b0.5-s0", "dynconv-b0.5-s0"]
    assert [r["status"] for r in rows] == ["ok"] * 3, [r.get("error") for r in rows]
    by_job = {r["job"]: r for r in rows}
    static, aig = by_job["static-d8-w0.25-s0"], by_job["convnet_aig-b0.5-s0"]
    assert static["mac_fraction"] == 1.0 and static["b1_realized_ratio"] == 1.0
    assert aig["test_images"] == 24 and 0.0 <= aig["accuracy"] <= 1.0
    # Open-ish gates after two steps: theoretical MACs of the recipe are near the static base's, sparse execution
    # runs exactly the theoretical MACs (ConvNet-AIG skips whole blocks), both recorded per sample.
    assert aig["dense_macs"] == pytest.approx(static["mean_macs"])
    assert aig["mean_executed_macs"] == pytest.approx(aig["mean_macs"])
    assert sum(aig["mac_hist"]["correct"]) + sum(aig["mac_hist"]["incorrect"]) == 24
    assert {"b1_realized_ratio", "b4_realized_ratio", "b4_sparse_ms"} <= set(aig)
    assert len(aig["examples"]["pred"]) == 3 and aig["examples"]["decisions"]
    assert aig["machine"]["loadavg_1m"] is not None and aig["settings"]["threads"] == 1

    for name in ("results.csv", "results.json", "report.md", "machine.json", "examples/synthetic.json"):
        assert (tmp_path / name).exists(), name
    for name in ("accuracy_vs_macs", "accuracy_vs_latency", "realized_speedup", "mac_histograms"):
        _assert_png(tmp_path / f"{name}.png")
    for recipe in RECIPES:
        _assert_png(tmp_path / "decisions" / f"{recipe}.png")
    report = (tmp_path / "report.md").read_text()
    for recipe in RECIPES:
        assert f"- **{recipe}** (" in report and "beats the static front: **" in report
    assert "Realized speedup ÷ MAC speedup at budgets 0.5" in report
    assert "](accuracy_vs_macs.png)" in report and "decisions/dynconv.png" in report
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 4

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    calls.clear()
    again = run_suite(TINY, tmp_path, RECIPES, progress=False, report=False)
    assert calls == []  # nothing recomputed
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")} == before
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]


def _fake_row(job, profile, data, **kwargs) -> dict:
    return {"job": job.id, "kind": job.kind, "recipe": job.recipe or "static", "family": "f", "model": job.model,
            "width": job.width, "depth": job.depth, "budget": job.budget, "seed": job.seed, "dataset": job.dataset,
            "status": "ok", "error": "", "accuracy": 0.5, "mean_macs": 1.0, "test_images": 10,
            "mac_fraction": job.budget or 1.0, "achieved": job.budget}  # fmt: skip


def test_a_failing_job_is_recorded_and_the_suite_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite, "load_data", lambda *a, **k: None)
    monkeypatch.setattr(suite, "example_payload", lambda data: {})

    def flaky(job, *args, **kwargs):
        if job.recipe == "convnet_aig":
            raise RuntimeError("gate exploded")
        return _fake_row(job, *args, **kwargs)

    monkeypatch.setattr(suite, "run_job", flaky)
    monkeypatch.setattr("dynnet.bench.report.write_outputs", lambda rows, out, **kw: None)
    rows = run_suite(TINY, tmp_path, RECIPES, progress=False)
    status = {r["job"]: (r["status"], r["error"]) for r in rows}
    assert status["convnet_aig-b0.5-s0"] == ("error", "RuntimeError: gate exploded")
    assert status["dynconv-b0.5-s0"][0] == "ok" and status["static-d8-w0.25-s0"][0] == "ok"
    stored = json.loads((tmp_path / "runs" / "convnet_aig-b0.5-s0.json").read_text())
    assert stored["status"] == "error" and "gate exploded" in stored["traceback"]

    ran: list[str] = []
    monkeypatch.setattr(suite, "run_job", lambda job, *a, **k: ran.append(job.id) or _fake_row(job, *a, **k))
    run_suite(TINY, tmp_path, RECIPES, progress=False)
    assert ran == []  # a failed job counts as finished...
    run_suite(TINY, tmp_path, RECIPES, progress=False, retry_errors=True)
    assert ran == ["convnet_aig-b0.5-s0"]  # ...unless asked to retry
    run_suite(dataclasses.replace(TINY, lr=0.05), tmp_path, ["dynconv"], progress=False)
    assert ran[1:] == ["static-d8-w0.25-s0", "dynconv-b0.5-s0"]  # changed settings: recomputed


def test_plan_jobs_covers_baselines_recipes_budgets_seeds_and_family_datasets() -> None:
    profile = dataclasses.replace(TINY, budgets=(0.25, 0.75), seeds=(0, 1), static_depths=(8, 14),
                                  static_widths=(0.5, 1.0), family_datasets=(("spatial", "other_data"),))  # fmt: skip
    jobs = plan_jobs(profile, RECIPES)
    ids = [j.id for j in jobs]
    assert len(ids) == len(set(ids))
    static = [j for j in jobs if j.kind == "static"]
    assert len(static) == 2 * 2 * 2 * 2  # depths × widths × seeds × datasets (a family runs on another dataset)
    assert {j.dataset for j in static} == {"synthetic", "other_data"}
    aig = [j for j in jobs if j.recipe == "convnet_aig"]
    assert {(j.budget, j.seed, j.dataset) for j in aig} == {(b, s, "synthetic") for b in (0.25, 0.75) for s in (0, 1)}
    assert {j.dataset for j in jobs if j.recipe == "dynconv"} == {"other_data"}
    assert len(plan_jobs(TINY)) == 1 + len(suite_recipes())  # default: every registered recipe


def suite_recipes() -> list[str]:
    import dynnet

    return dynnet.list_recipes()


def test_profiles_are_valid_and_reject_bad_settings() -> None:
    quick, full = PROFILES["quick"], PROFILES["full"]
    assert len(quick.static_depths) * len(quick.static_widths) >= 4 and len(quick.budgets) >= 3
    assert len(full.seeds) >= 2 and full.test_subset is None
    with pytest.raises(ValueError, match="6n"):
        dataclasses.replace(quick, static_depths=(10,))
    with pytest.raises(ValueError, match="budgets"):
        dataclasses.replace(quick, budgets=(1.5,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.epochs = 3  # type: ignore[misc]
    standard = PROFILES["standard"]
    assert standard.init == "zoo" and standard.test_subset is None and standard.subset is None
    assert standard.pruned_fractions == standard.budgets == (0.25, 0.5, 0.75) and standard.shipped_static
    with pytest.raises(ValueError, match="need the trained base"):
        dataclasses.replace(quick, pruned_fractions=(0.5,))


def test_a_profile_that_starts_from_missing_shipped_weights_is_refused_before_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dynnet.zoo as zoo

    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setattr(suite, "run_job", lambda *a, **k: pytest.fail("a job ran"))
    profile = dataclasses.replace(TINY, init="zoo")
    with pytest.raises(ValueError, match="lacks: make it with `dynnet pretrain --model cifar_resnet8"):
        run_suite(profile, tmp_path / "out", ["convnet_aig"], progress=False)


def test_record_examples_is_generic_over_decisions() -> None:
    import dynnet

    torch.manual_seed(0)
    model = dynnet.create_model("cifar_resnet8", recipe="dynconv", budget=0.5, in_channels=1, width=0.25)
    dynnet.set_mode(model, "sparse")
    ex = record_examples(model, torch.randn(2, 1, 12, 12))
    assert len(ex["pred"]) == 2 and len(ex["macs"]) == 2
    spatial = [d for d in ex["decisions"] if d["granularity"] == "spatial"]
    assert spatial and spatial[0]["shape"] == [12, 12] and len(spatial[0]["values"][0]) == 144
    static = record_examples(dynnet.create_model("cifar_resnet8", in_channels=1, width=0.25), torch.randn(2, 1, 8, 8))
    assert static["decisions"] == [] and static["macs"] is None


def test_cli_options_override_the_profile_and_coexist_with_dynnet_bench_options(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)  # dynnet bench already has it
    suite.add_suite_arguments(parser)
    args = parser.parse_args(["--profile", "quick", "--budgets", "0.5,0.75", "--seeds", "1,2", "--threads", "2"])
    profile = suite.profile_from_args(args)
    assert profile.budgets == (0.5, 0.75) and profile.seeds == (1, 2) and profile.threads == 2
    assert profile.subset == PROFILES["quick"].subset

    runs = tmp_path / "runs"
    runs.mkdir()
    for job in plan_jobs(TINY, ["convnet_aig"]):
        (runs / f"{job.id}.json").write_text(json.dumps(_fake_row(job, TINY, None)))
    args = parser.parse_args(["--profile", "quick", "--out", str(tmp_path), "--report-only"])
    assert suite.bench_main(args) == 0
    assert "- **convnet_aig** (f): beats the static front: **no**" in (tmp_path / "report.md").read_text()


def test_pad_images_centres_the_batch_on_a_black_canvas_and_the_loader_keeps_its_sampler() -> None:
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    black = torch.tensor([-1.5])
    out = jobs.pad_images(x, (4, 5), black)
    assert out.shape == (2, 1, 4, 5)
    torch.testing.assert_close(out[:, :, 1:3, 1:4], x)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1:3, 1:4] = False
    assert bool((out[:, :, mask] == -1.5).all())

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.tensor([0, 1])), batch_size=1)
    padded = jobs._Padded(loader, (4, 5), black)
    assert len(padded) == 2 and padded.sampler is loader.sampler
    assert [tuple(b.shape) for b, _ in padded] == [(1, 1, 4, 5)] * 2


def test_a_budget_outside_the_declared_range_is_recorded_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dynnet.core import RECIPES as REGISTRY

    assert REGISTRY.get("act").budget.reachable[0] > 0.25  # the precondition: 0.25 is out of act's reach
    monkeypatch.setattr(suite, "load_data", lambda *a, **k: None)
    monkeypatch.setattr(suite, "example_payload", lambda data: {})
    ran: list[str] = []
    monkeypatch.setattr(suite, "run_job", lambda job, *a, **k: ran.append(job.id) or _fake_row(job, *a, **k))
    rows = run_suite(dataclasses.replace(TINY, budgets=(0.25, 0.5)), tmp_path, ["act"], progress=False)
    status = {r["job"]: r["status"] for r in rows}
    assert status["act-b0.25-s0"] == "unreachable" and status["act-b0.5-s0"] == "ok"
    assert "act-b0.25-s0" not in ran and "act-b0.5-s0" in ran
    report = (tmp_path / "report.md").read_text()
    assert "Not run, budget outside the recipe's declared reachable range" in report and "act at 0.25" in report
    assert "## Failed jobs" not in report


def test_a_fine_tuning_profile_starts_recipes_from_the_shipped_base_and_adds_pruned_and_shipped_baselines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dynnet.zoo as zoo
    from dynnet.train.pretrain import pretrain

    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "weights")
    pretrain("cifar_resnet8", "synthetic", out_dir=tmp_path / "base", width=0.25, epochs=1, batch_size=32,
             dataset_kwargs=dict(TINY.dataset_kwargs))  # fmt: skip
    zoo.ship(tmp_path / "base")
    profile = dataclasses.replace(TINY, static_depths=(), static_widths=(), init="zoo", distill=1.0,
                                  pruned_fractions=(0.5,), shipped_static=True,
                                  recipe_settings=(("convnet_aig", (("hidden", 5),)),))  # fmt: skip
    assert profile.init_for("synthetic") == "zoo:cifar_resnet8x0.25-synthetic"
    import dynnet.train

    seen: list[tuple[Any, ...]] = []
    configs: list[Any] = []
    real_fit = dynnet.train.fit

    def spying_fit(model, *args, init=None, teacher=None, **kwargs):
        seen.append((init, teacher is not None, args[1].distill))
        if hasattr(model, "config"):
            configs.append(model.config)
        return real_fit(model, *args, init=init, teacher=teacher, **kwargs)

    monkeypatch.setattr("dynnet.train.fit", spying_fit)
    rows = run_suite(profile, tmp_path / "out", ["convnet_aig"], progress=False)
    by_job = {r["job"]: r for r in rows}
    assert set(by_job) == {"pruned-p0.5-s0", "shipped-cifar_resnet8x0.25-synthetic", "convnet_aig-b0.5-s0"}
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    pruned, shipped, aig = by_job["pruned-p0.5-s0"], by_job["shipped-cifar_resnet8x0.25-synthetic"], by_job[
        "convnet_aig-b0.5-s0"]  # fmt: skip
    assert abs(pruned["mac_fraction"] - 0.5) <= 0.1 and pruned["recipe"] == "pruned"
    assert shipped["mac_fraction"] == 1.0 and shipped["history"] == []
    assert aig["init"] == "zoo:cifar_resnet8x0.25-synthetic" and aig["distill"] == 1.0
    assert aig["recipe_settings"] == {"hidden": 5} and pruned["recipe_settings"] == {}
    assert [c.hidden for c in configs] == [5]  # the setting reached the recipe's config
    assert sorted(seen, key=str) == sorted(
        [(None, True, 1.0), ("zoo:cifar_resnet8x0.25-synthetic", False, 1.0)], key=str
    )  # the pruned network distils from its dense base; the recipe starts from the base (and distils from it)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "pruned to 0.5 + fine-tuned" in report
    assert "shipped `cifar_resnet8x0.25-synthetic` (its own schedule)" in report


def test_a_trained_budget_is_trained_once_and_calibrated_to_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = dataclasses.replace(TINY, budgets=(0.4, 0.7), static_depths=(), static_widths=(), trained_budget=0.7,
                                  val_fraction=0.4)  # fmt: skip
    jobs = plan_jobs(profile, ["sact"])
    assert [(j.id, j.trained_budget) for j in jobs] == [("sact-b0.7-s0", None), ("sact-b0.4-s0", 0.7)]
    assert jobs[1].trained_job() == jobs[0]
    # A recipe whose calibration does not transfer between distant budgets is trained at every budget.
    from dynnet.core import RECIPES

    assert not RECIPES.get("convnet_aig").budget.transfers
    assert [(j.id, j.trained_budget) for j in plan_jobs(profile, ["convnet_aig"])] == [
        ("convnet_aig-b0.4-s0", None), ("convnet_aig-b0.7-s0", None)]  # fmt: skip
    # A budget list without the trained budget still gets the trained job (first), which the others calibrate.
    assert [j.id for j in plan_jobs(dataclasses.replace(profile, budgets=(0.4,)), ["sact"])] == [
        "sact-b0.7-s0", "sact-b0.4-s0"]  # fmt: skip
    rows = {r["job"]: r for r in run_suite(profile, tmp_path / "out", ["sact"], progress=False)}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error") for r in rows.values()]
    high, low = rows["sact-b0.7-s0"], rows["sact-b0.4-s0"]
    assert high["trained_budget"] == 0.7 and low["trained_budget"] == 0.7

    def training(row: dict) -> list[tuple]:
        return [(e["step"], e["train_loss"], e["seconds"]) for e in row["history"]]

    assert training(low) == training(high)  # the same training (its wall time too), loaded from its checkpoint
    assert low["calibration"]["calibrated"] and low["achieved_val"] == pytest.approx(0.4, abs=0.05)
    assert high["achieved_val"] == pytest.approx(0.7, abs=0.05)  # 38 validation images: coarse steps
    assert low["mac_fraction"] < high["mac_fraction"]
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".gitignore", "sact-b0.7-s0"]
    # A change of the recipe's fine-tune defaults changes the settings: its jobs run again.
    import dynnet.core.recipe as recipe

    before = jobs[0].settings(profile)
    monkeypatch.setattr(recipe, "FINE_TUNE_DEFAULTS", {**recipe.FINE_TUNE_DEFAULTS, "track_budget_every": 7})
    assert jobs[0].settings(dataclasses.replace(profile, init="zoo")) != before


def test_a_checkpoint_left_by_other_settings_is_not_resumed(tmp_path: Path) -> None:
    folder = tmp_path / "convnet_aig-b0.5-s0"
    jobs._claim_checkpoint(folder, {"lr": 0.02})
    (folder / "checkpoint.json").write_text("{}")  # a finished run's checkpoint
    jobs._claim_checkpoint(folder, {"lr": 0.02})
    assert (folder / "checkpoint.json").exists()  # same settings: kept, fit resumes it
    jobs._claim_checkpoint(folder, {"lr": 0.05})
    assert not (folder / "checkpoint.json").exists() and (folder / "job.json").exists()  # other settings: removed
    legacy = tmp_path / "old"
    legacy.mkdir()
    (legacy / "checkpoint.json").write_text("{}")
    jobs._claim_checkpoint(legacy, {"lr": 0.02})
    assert not (legacy / "checkpoint.json").exists()  # no record of its settings: not trusted


def test_rows_made_with_other_settings_are_marked_stale() -> None:
    from dynnet.bench.suite import mark_stale

    current = {job.id: job for job in plan_jobs(TINY, RECIPES)}
    rows = [_fake_row(job, TINY, None) | {"settings": job.settings(TINY)} for job in current.values()]
    rows[1]["settings"] = dict(rows[1]["settings"], epochs=99)  # made by an earlier schedule
    rows.append({"job": "retired-b0.5-s0", "settings": {}})  # a job the profile no longer plans
    marked = mark_stale(rows, dataclasses.replace(TINY, budgets=(0.5,)))
    assert [r["stale"] for r in marked] == [False, True, False, False]


def test_a_revised_recipe_makes_its_rows_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    from dynnet.bench.suite import mark_stale
    from dynnet.core import RECIPES as REGISTRY

    name = RECIPES[0]
    job = next(j for j in plan_jobs(TINY, [name]) if j.recipe == name)
    row = _fake_row(job, TINY, None) | {"settings": job.settings(TINY)}
    assert "revision" not in row["settings"] and not mark_stale([dict(row)], TINY)[0]["stale"]
    get = REGISTRY.get
    monkeypatch.setattr(REGISTRY, "get", lambda n: dataclasses.replace(get(n), revision=1) if n == name else get(n))
    assert job.settings(TINY)["revision"] == 1
    assert mark_stale([dict(row)], TINY)[0]["stale"]
