"""The real ``dynnet`` command in a subprocess: what a new user types, what the shell sees.

Exit status 2 and exactly one ``dynnet: error:`` line on stderr for bad input, nothing on stderr that is not the
user's business, no traceback, and no file of an earlier run changed without ``--force``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DYNNET = [sys.executable, "-m", "dynnet.cli"]
TINY_RUN = ["--model", "cifar_resnet8", "--width", "0.25", "--data", "synthetic", "--epochs", "1", "--subset", "64",
            "--batch-size", "32", "--no-profile"]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def dynnet(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``dynnet ARGS`` as the shell would."""
    return subprocess.run([*DYNNET, *args], capture_output=True, text=True, timeout=timeout, env=_env())


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("dynnet: error: "), proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


# -- start-up ------------------------------------------------------------------------------------------------------
def test_help_imports_no_torch_and_prints_nothing_on_stderr() -> None:
    code = (
        "import sys\nfrom dynnet.cli import main\ncode = main(['--help'])\n"
        "assert 'torch' not in sys.modules, 'dynnet --help imported torch'\nsys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "quickstart" in proc.stdout
    proc = dynnet("--help")
    assert proc.returncode == 0 and proc.stderr == "" and "quickstart" in proc.stdout


def test_no_cuda_runtime_warning() -> None:
    """torch.utils.cpp_extension warns "No CUDA runtime is found" at import on a machine without CUDA; dynnet imports
    it in every command (the compiled kernels, torch.utils.benchmark), so it filters that line."""
    code = "import dynnet\nimport torch.utils.cpp_extension\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0 and "No CUDA runtime" not in proc.stderr, proc.stderr
    proc = dynnet("macs", "--model", "cifar_resnet8", "--recipe", "convnet_aig", "--input", "1,8,8")
    # (A machine without a C++ compiler may still warn, once, that the compiled kernels are unavailable.)
    assert proc.returncode == 0 and "No CUDA runtime" not in proc.stderr and "Traceback" not in proc.stderr


def test_output_closed_early_ends_quietly() -> None:
    """``dynnet list recipes | head -1``: the reader closes the pipe; no BrokenPipeError traceback."""
    proc = subprocess.Popen([*DYNNET, "list", "recipes"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert err == "", err


# -- macs ----------------------------------------------------------------------------------------------------------
def test_macs_of_a_torchvision_model_with_wrong_channels() -> None:
    assert_one_error_line(dynnet("macs", "--model", "resnet50", "--input", "1,224,224"), "3 input channels, got 1")


def test_macs_of_dynconv_on_a_bottleneck_resnet() -> None:
    """torchvision's Bottleneck strides in its second convolution: the spatial masks must follow (was a 90-line
    traceback from the pixel kernels)."""
    proc = dynnet("macs", "--model", "resnet50", "--recipe", "dynconv", "--budget", "0.5", "--input", "3,64,64")
    assert proc.returncode == 0, proc.stderr
    assert "per sample:" in proc.stdout and "Traceback" not in proc.stderr


# -- train ---------------------------------------------------------------------------------------------------------
def test_train_unknown_model_names_the_known_ones(tmp_path: Path) -> None:
    # Fashion-MNIST is grey: the name must be checked before torchvision's 3-channel rule (and before the data).
    line = assert_one_error_line(
        dynnet("train", "--model", "nope", "--out", str(tmp_path / "run")), "unknown model 'nope'"
    )
    assert "cifar_resnet20" in line and "torchvision" in line
    assert not (tmp_path / "run").exists()


def test_train_bad_data_leaves_no_folder_behind(tmp_path: Path) -> None:
    proc = dynnet("train", "--model", "cifar_resnet8", "--data", "nope", "--out", str(tmp_path / "a" / "b"))
    assert_one_error_line(proc, "unknown dataset 'nope'")
    assert not (tmp_path / "a").exists()


def test_a_run_folder_is_resumed_or_refused_never_silently_replaced(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = dynnet("train", *TINY_RUN, "--out", str(run))
    assert first.returncode == 0, first.stderr
    before = _snapshot(run)
    assert {"run.json", "results.json", "checkpoint.json", "checkpoint.safetensors", "log.csv"} <= before.keys()

    # Another recipe into the same folder: refused in one line, nothing touched.
    line = assert_one_error_line(dynnet("train", *TINY_RUN, "--recipe", "skipnet", "--out", str(run)), "--force")
    assert "recipe 'convnet_aig' there, 'skipnet' now" in line
    assert _snapshot(run) == before

    # The same command again: the run is finished, so nothing to do and nothing rewritten.
    again = dynnet("train", *TINY_RUN, "--out", str(run))
    assert again.returncode == 0 and "already holds this run, finished" in again.stdout, again.stderr
    assert _snapshot(run) == before

    # eval finds the run's checkpoint from the folder.
    ev = dynnet("eval", "--checkpoint", str(run), "--data", "synthetic", "--mode", "masked", "--max-batches", "1")
    assert ev.returncode == 0 and "accuracy" in ev.stdout, ev.stderr

    # --force replaces it.
    forced = dynnet("train", *TINY_RUN, "--recipe", "skipnet", "--out", str(run), "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((run / "checkpoint.json").read_text())["recipe"] == "skipnet"

    # An unfinished run (no results.json yet) with the same settings is resumed from its checkpoint.
    (run / "results.json").unlink()
    resumed = dynnet("train", *TINY_RUN, "--recipe", "skipnet", "--out", str(run))
    assert resumed.returncode == 0 and "resuming it" in resumed.stdout, resumed.stderr
    assert "resumed from" in resumed.stderr and (run / "results.json").is_file()

    # A run whose settings cannot be read (no run.json, no results.json): refused, not guessed.
    (run / "run.json").unlink()
    (run / "results.json").unlink()
    kept = _snapshot(run)
    assert_one_error_line(dynnet("train", *TINY_RUN, "--out", str(run)), "cannot read", "--force")
    assert _snapshot(run) == kept


# -- eval ----------------------------------------------------------------------------------------------------------
def test_eval_of_a_folder_without_a_checkpoint(tmp_path: Path) -> None:
    assert_one_error_line(dynnet("eval", "--checkpoint", str(tmp_path), "--data", "synthetic"), "holds no checkpoint")


@pytest.mark.parametrize("what", ["recipes", "models", "datasets"])
def test_list_prints_to_stdout_only(what: str) -> None:
    proc = dynnet("list", what)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout.strip(), proc.stderr
