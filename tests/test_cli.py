"""The `dynnet` command: real output for list / macs / eval, exit status 2 with one line on bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import dynnet
from dynnet.cli import main
from dynnet.macs.report import format_macs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "cifar_resnet8", "--width", "0.25", "--data", "synthetic", "--subset", "64", "--batch-size", "8",
        "--no-profile"]  # fmt: skip
"""A run of 8 steps per epoch, in a second or two."""


def dynnet_process(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``dynnet ARGS`` run as the shell runs it (``python -m dynnet``), stdout and stderr piped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dynnet", *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


def test_list_recipes_and_datasets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "recipes"]) == 0
    out = capsys.readouterr().out
    assert "convnet_aig" in out and "layer_skip" in out and "Adaptive Inference Graphs" in out
    assert main(["list", "datasets"]) == 0
    assert "fashion_mnist" in capsys.readouterr().out.split()
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "models:" in out and "cifar_resnet20" in out


def test_macs_table_matches_count_macs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["macs", "--model", "cifar_resnet8", "--input", "1,16,16", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    model = dynnet.create_model("cifar_resnet8", in_channels=1).eval()
    report = dynnet.count_macs(model, torch.randn(1, 1, 16, 16))
    assert f"per sample: {report.mean:,.0f} MACs" in out
    layer1 = report.by_module()["layer1"]
    assert any(line.split()[:1] == ["layer1"] and format_macs(layer1) in line for line in out.splitlines())


def test_macs_of_a_converted_model(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["macs", "--model", "cifar_resnet8", "--recipe", "convnet_aig", "--budget", "0.5", "--input", "3,16,16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "net.layer1" in out and "fraction 1.000" in out  # fresh gates are open


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["macs", "--model", "cifar_resnet8", "--recipe", "no_such_recipe"], "unknown recipe 'no_such_recipe'"),
        (["macs", "--model", "no_such_model"], "unknown model 'no_such_model'"),
        (["macs", "--model", "cifar_resnet8", "--recipe", "convnet_aig", "--budget", "1.5"], "--budget: expected a"),
        (["train", "--data", "no_such_data", "--epochs", "1"], "unknown dataset 'no_such_data'"),
        (["macs", "--model", "cifar_resnet8", "--input", "3,32"], "C,H,W"),
        (["prune", "--init", "zoo:nope", "--macs", "1.5", "--out", "x"], "fraction in (0, 1], got '1.5'"),
        (["prune", "--init", "nowhere", "--macs", "0.5", "--out", "x", "--data", "synthetic"], "no weights there"),
        (["train", "--data", "synthetic", "--recipe", "fbs", "--decision-lr-scale", "10"], "give both"),
        (["train", "--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
        (["train", "--threads", "0"], "--threads: expected a positive integer"),
        (["train", "--lr", "inf"], "--lr: expected a positive number"),
        (["train", "--max-steps", "-1"], "--max-steps: expected a positive integer"),
        (["train", "--checkpoint-every", "x"], "--checkpoint-every: expected an integer >= 0"),
        (["train", "--resume", "--out", "no/such/run"], "no/such/run holds no run to resume: drop --resume"),
        (["train", "--resume", "--force", "--out", "no/such/run"], "--resume and --force contradict each other"),
        # quickstart with --init of its own took its unset schedule along (a TypeError on None / int).
        (["quickstart", "--init", "nowhere", "--data", "synthetic"], "no weights there"),
    ],
)
def test_errors_exit_2_with_one_line(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dynnet: error: ") and match in err[-1]
    assert not any("Traceback" in line for line in err)


def test_eval_of_corrupt_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ck.json").write_text("{truncated")
    assert main(["eval", "--checkpoint", str(tmp_path / "ck"), "--data", "synthetic"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynnet: error: corrupt checkpoint") and "ck.json" in err


def test_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["train", "--model", "cifar_resnet8", "--width", "0.25", "--data", "synthetic", "--epochs", "1",
            "--subset", "64", "--batch-size", "32", "--out", str(out), "--no-profile"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "test accuracy (sparse)" in text and (out / "results.json").is_file()
    assert main(["eval", "--checkpoint", str(out / "checkpoint"), "--data", "synthetic", "--mode", "masked"]) == 0
    text = capsys.readouterr().out
    assert "masked mode" in text and "accuracy" in text


def test_train_prints_budget_and_achieved_then_calibrate_writes_a_new_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["train", "--model", "cifar_resnet8", "--width", "0.25", "--data", "synthetic", "--epochs", "1",
            "--subset", "64", "--batch-size", "32", "--out", str(out), "--no-profile", "--budget", "0.6"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    line = next(t for t in text.splitlines() if t.strip().startswith("budget"))
    assert "0.60 → achieved" in line and "(val)" in line and "(test)" in line and "calibrated on validation" in line
    ck = str(out / "checkpoint")
    assert main(["calibrate", "--checkpoint", ck, "--budget", "0.8", "--data", "synthetic"]) == 0
    text = capsys.readouterr().out
    assert "budget 0.80 → achieved" in text and (out / "checkpoint-b0.8.json").is_file()
    # Never overwritten without --force.
    assert main(["calibrate", "--checkpoint", ck, "--budget", "0.8", "--data", "synthetic"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", ck, "--budget", "0.8", "--data", "synthetic", "--force"]) == 0
    capsys.readouterr()
    argv = ["calibrate", "--checkpoint", ck, "--budget", "0.7", "--data", "synthetic", "--reestimate-bn"]
    assert main(argv) == 0
    assert "batch norms re-estimated" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out / "checkpoint-b0.8"), "--data", "synthetic"]) == 0
    assert "budget 0.80 → achieved" in capsys.readouterr().out


def test_calibrate_to_milliseconds_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dynnet.calibration as calibration
    from dynnet.core.budget import mean_mac_fraction

    out = tmp_path / "run"
    argv = ["train", "--model", "cifar_resnet8", "--width", "0.25", "--data", "synthetic", "--epochs", "1",
            "--subset", "64", "--batch-size", "32", "--out", str(out), "--no-profile", "--budget", "0.6"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    ck = str(out / "checkpoint")
    # A clock that cannot be noisy: 10 ms per image at the dense MACs, in proportion below (the real one is timed).
    monkeypatch.setattr(
        calibration, "measured_latency", lambda batch_size=1: lambda m, xs: 10 * mean_mac_fraction(m, xs)
    )
    assert main(["calibrate", "--checkpoint", ck, "--budget-ms", "7", "--data", "synthetic"]) == 0
    text = capsys.readouterr().out
    line = next(t for t in text.splitlines() if t.strip().startswith("budget"))
    measured = float(line.split("measured ")[1].split(" ms")[0])
    assert line.strip().startswith("budget 7 ms → measured") and measured == pytest.approx(7, rel=0.03)
    assert (out / "checkpoint-7ms.json").is_file()
    both = ["calibrate", "--checkpoint", ck, "--budget", "0.5", "--budget-ms", "7", "--data", "synthetic"]
    assert main(both) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_quickstart_fine_tunes_the_shipped_base_and_shows_the_static_networks_side_by_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import dynnet.zoo as zoo
    from dynnet.train.pretrain import pretrain
    from dynnet.train.prune import prune

    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "weights")
    out = tmp_path / "quick"
    argv = ["quickstart", "--model", "cifar_resnet8", "--data", "synthetic", "--subset", "64", "--batch-size", "32",
            "--out", str(out), "--no-profile", "--epochs", "1"]  # fmt: skip
    assert main(argv) == 0  # nothing shipped: from scratch, and it says so
    assert "no shipped base 'cifar_resnet8-synthetic'" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["static"] == []

    data = {"num_train": 96, "num_test": 64}
    pretrain("cifar_resnet8", "synthetic", out_dir=tmp_path / "base", epochs=1, batch_size=32, dataset_kwargs=data)
    zoo.ship(tmp_path / "base")
    prune("zoo:cifar_resnet8-synthetic", 0.5, out_dir=tmp_path / "p", model="cifar_resnet8", data="synthetic",
          epochs=1, batch_size=32, dataset_kwargs=data)  # fmt: skip
    zoo.ship(tmp_path / "p")
    pretrain("cifar_resnet8", "synthetic", out_dir=tmp_path / "half", width=0.5, epochs=1, batch_size=32,
             dataset_kwargs=data)  # fmt: skip
    zoo.ship(tmp_path / "half")  # network selection's little network
    out = tmp_path / "quick2"
    argv = [*argv[:-5], "--out", str(out), "--no-profile"]  # the quickstart's own fine-tuning schedule
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "no shipped base" not in text
    for label in ("side by side", "dense base", "cifar_resnet8-synthetic", "dynamic network_selection", "verdict"):
        assert label in text
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["init"] == "zoo:cifar_resnet8-synthetic" and results["settings"]["epochs"] == 1
    assert results["settings"]["distill"] == 1.0
    assert results["settings"]["train_overrides"] == {}  # the recipe's fine-tuning defaults (fine_tune_settings)
    assert results["settings"]["model_kwargs"] == {"little": "zoo:cifar_resnet8x0.5-synthetic"}  # the shipped one
    assert json.loads((out / "checkpoint.json").read_text())["state"]["config"]["budget_start"] == 1.0
    assert {r["name"] for r in results["static"]} == {
        "cifar_resnet8-synthetic", "cifar_resnet8p0.5-synthetic", "cifar_resnet8x0.5-synthetic"
    }  # fmt: skip
    fractions = sorted(r["mac_fraction"] for r in results["static"])
    assert fractions[0] < 0.35 and abs(fractions[1] - 0.5) <= 0.05 and fractions[2] == pytest.approx(1.0)


def test_best_static_is_the_most_accurate_network_within_the_dynamic_models_macs() -> None:
    from dynnet.bench.experiment import best_static

    rows = [{"name": "dense", "mac_fraction": 1.0, "accuracy": 0.93}, {"name": "p0.5", "mac_fraction": 0.5,
            "accuracy": 0.90}, {"name": "x0.5", "mac_fraction": 0.27, "accuracy": 0.88}, {"name": "p0.52",
            "mac_fraction": 0.52, "accuracy": 0.91}]  # fmt: skip
    assert best_static(rows, 0.5)["name"] == "p0.52"  # within the benchmark's tolerance of 0.03
    assert best_static(rows, 0.45)["name"] == "x0.5"
    assert best_static(rows, 0.2) is None


def test_max_steps_stops_the_run_and_checkpoint_every_saves_within_the_epoch(tmp_path: Path) -> None:
    run = ["train", *TINY, "--recipe", "none", "--epochs", "2", "--out", "run"]
    proc = dynnet_process(*run, "--max-steps", "3", "--checkpoint-every", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [e["step"] for e in results["history"]] == [3]  # 8 steps an epoch, 16 asked: stopped at 3
    assert results["settings"]["train_overrides"] == {"max_steps": 3, "checkpoint_every_steps": 2}
    # Saved at step 2 and again at the end (step 3): the second save kept the first as .prev. Without
    # --checkpoint-every a static run saves once, at the end of its epoch.
    assert (tmp_path / "run" / "checkpoint.safetensors.prev").is_file()
    # stderr is a pipe here: no progress bar unless asked for.
    assert "it/s]" not in proc.stderr and "s/it]" not in proc.stderr
    # The run folder knows both settings: another value is refused, in one line naming it.
    again = dynnet_process(*run, "--max-steps", "4", "--checkpoint-every", "2", cwd=tmp_path)
    err = [line for line in again.stderr.splitlines() if line.strip()]
    assert again.returncode == 2 and len(err) == 1 and "max_steps 3 there, 4 now" in err[0], again.stderr


def test_a_run_killed_between_checkpoints_resumes_from_the_last_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    import dynnet.train.loop as loop

    def argv(out: Path, every: str = "2") -> list[str]:
        return ["train", *TINY, "--recipe", "none", "--epochs", "1", "--checkpoint-every", every, "--out", str(out)]

    assert main(argv(tmp_path / "whole")) == 0
    train_step = loop._train_step

    def killed_at_step_5(state: Any, *args: Any) -> None:
        if state.step == 5:
            raise KeyboardInterrupt  # as a kill -9 would: the checkpoint of step 4 is on disk
        train_step(state, *args)

    monkeypatch.setattr(loop, "_train_step", killed_at_step_5)
    capsys.readouterr()
    assert main(argv(tmp_path / "killed")) == 130  # Ctrl-C: one line saying what was kept, no traceback
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"dynnet: interrupted; the last checkpoint is in {tmp_path / 'killed'}: the same command resumes from it"
        )
    )
    state = json.loads((tmp_path / "killed" / "checkpoint.json").read_text())["state"]
    assert state["step"] == 4 and state["batch_in_epoch"] == 4
    monkeypatch.setattr(loop, "_train_step", train_step)
    capsys.readouterr()
    assert main([*argv(tmp_path / "killed", every="3"), "--resume"]) == 0  # the interval is not a run setting
    assert "resuming it" in capsys.readouterr().out
    whole = load_file(tmp_path / "whole" / "checkpoint.safetensors")
    resumed = load_file(tmp_path / "killed" / "checkpoint.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0)


def test_ctrl_c_ends_a_run_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    """SIGINT to the real entry point while it trains: status 130, the last stderr line says where the checkpoint
    is, no traceback, and the run folder keeps the run (another setting is refused, the same one resumes)."""
    run = ["train", *TINY, "--recipe", "none", "--epochs", "200", "--checkpoint-every", "2", "--out", "run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A job started in the background by a shell ignores SIGINT, and so would the child: give it the default, as a
    # terminal's foreground process has.
    proc = subprocess.Popen([sys.executable, "-m", "dynnet", *run], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoint.json").is_file() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last == "dynnet: interrupted; the last checkpoint is in run: the same command resumes from it"
    again = dynnet_process(*run, "--max-steps", "1", cwd=tmp_path)  # another setting: refused, the run is kept
    assert again.returncode == 2 and "max_steps None there, 1 now" in again.stderr, again.stderr


def test_a_run_folder_of_an_older_dynnet_resumes(tmp_path: Path) -> None:
    """A run.json written before --max-steps and --grey-to-rgb existed has neither: it was made with their
    defaults, and the same command resumes it."""
    from dynnet.cli_runs import _claim_run_folder

    old = {"model": "cifar_resnet8", "recipe": None, "budget": None, "dataset": "synthetic", "epochs": 1,
           "batch_size": 8, "lr": 0.1, "subset": 64, "seed": 0, "model_kwargs": {}, "init": None,
           "distill": 0.0}  # fmt: skip
    (tmp_path / "run.json").write_text(json.dumps({"format": "dynnet-run", "settings": old}))
    (tmp_path / "checkpoint.json").write_text("{}")
    now = {**old, "max_steps": None, "grey_to_rgb": False}
    assert _claim_run_folder(tmp_path, now, force=False)[0] == "resume"
    with pytest.raises(ValueError, match="max_steps None there, 5 now"):
        _claim_run_folder(tmp_path, {**now, "max_steps": 5}, force=False)


@pytest.mark.parametrize(
    ("argv", "target"),
    [
        (["train", "--data", "synthetic", "--out", "{tmp}/run"], "dynnet.bench.experiment.run_experiment"),
        (["quickstart", "--data", "synthetic", "--out", "{tmp}/run"], "dynnet.bench.experiment.run_experiment"),
        (["pretrain", "--data", "synthetic", "--out", "{tmp}/base"], "dynnet.train.pretrain.pretrain"),
        (["prune", "--init", "base", "--macs", "0.5", "--out", "{tmp}/p"], "dynnet.train.prune.prune"),
    ],
)
def test_progress_bar_when_stderr_is_a_terminal_unless_told(
    argv: list[str], target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []

    def record(*args: Any, progress: bool, **kwargs: Any) -> None:
        seen.append(progress)
        raise ValueError("recorded")

    monkeypatch.setattr(target, record)
    argv = [a.format(tmp=tmp_path) for a in argv]
    for tty, flags in ((True, []), (False, []), (True, ["--no-progress"]), (False, ["--progress"])):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        assert main([*argv, *flags]) == 2
    assert seen == [True, False, False, True]
    assert "recorded" in capsys.readouterr().err


def test_grey_to_rgb_trains_a_torchvision_network_on_fashion_mnist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dynnet.data.testing import write_fake_fashion_mnist

    root = write_fake_fashion_mnist(tmp_path / "data", num_train=40, num_test=20)
    out = tmp_path / "run"
    argv = ["train", "--model", "resnet18", "--recipe", "none", "--data", "fashion_mnist", "--data-root", str(root),
            "--subset", "0", "--batch-size", "8", "--max-steps", "1", "--no-profile", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2  # refused, and the refusal names the option
    assert "--grey-to-rgb" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()
    assert main([*argv, "--grey-to-rgb"]) == 0
    assert "test accuracy (sparse)" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["settings"]["grey_to_rgb"] is True
    # eval repeats the grey images too: the checkpoint's network takes 3 channels.
    assert main(["eval", "--checkpoint", str(out), "--data", "fashion_mnist", "--data-root", str(root)]) == 0
    assert "images 20" in capsys.readouterr().out


def test_set_gives_recipe_settings_and_refuses_what_is_not_one(tmp_path: Path) -> None:
    run = ["train", *TINY, "--recipe", "fbs", "--budget", "0.6", "--epochs", "1", "--max-steps", "1"]
    ok = dynnet_process(*run, "--set", "saliency_weight=0.001", "--out", "a", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    settings = json.loads((tmp_path / "a" / "results.json").read_text())["settings"]
    assert settings["model_kwargs"]["saliency_weight"] == 0.001
    for extra, match in ((["--set", "nope=1"], "has no setting by that name either (its settings: ['budget', "),
                         (["--recipe", "none", "--set", "a=1"], "--set gives settings of a recipe")):  # fmt: skip
        proc = dynnet_process(*run, *extra, "--out", "b", cwd=tmp_path)
        err = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and err[-1].startswith("dynnet: error:") and match in err[-1], proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()  # a refused start leaves no run folder behind
