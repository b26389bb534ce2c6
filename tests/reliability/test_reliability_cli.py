"""The ``dynnet`` command under bad arguments: exit status 0 with output, or 2 with one ``dynnet: error:`` line.

Never a Python traceback: ``main`` must not raise.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

cli = pytest.importorskip("dynnet.cli")


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _assert_clean(argv: list[str]) -> tuple[int, str, str]:
    code, out, err = _run(argv)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("W")]  # torch's log noise
        assert lines and lines[-1].startswith("dynnet: error:"), (argv, err)
        assert "Traceback" not in err
    return code, out, err


def _opt(flag: str, values: list[str]) -> st.SearchStrategy[list[str]]:
    return st.one_of(st.just([]), st.sampled_from(values).map(lambda v: [flag, v]))


MACS_ARGS = st.tuples(
    st.sampled_from(["cifar_resnet8", "nope_net", "timm/nope_net", ""]),
    _opt("--recipe", ["convnet_aig", "nope", "CONVNET_AIG"]),
    _opt("--input", ["1,8,8", "3,16,16", "3,0,8", "3,8", "a,b,c", "-1,8,8", ""]),
    _opt("--budget", ["0.5", "1", "0", "-1", "nan", "inf", "x"]),
    _opt("--batch", ["1", "3", "0", "-2", "x"]),
    _opt("--depth", ["0", "1", "-1"]),
    _opt("--num-classes", ["10", "3", "x"]),
)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(args=MACS_ARGS)
def test_macs_command_fuzz(args: tuple) -> None:
    model, *opts = args
    argv = ["macs", "--model", model, *[a for o in opts for a in o]]
    code, out, _ = _assert_clean(argv)
    if code == 0:
        assert "per sample:" in out


@pytest.mark.parametrize(
    ("argv", "words"),
    [([], "required"), (["nope"], "invalid choice"), (["macs"], "--model"), (["list", "nope"], "invalid choice"),
     (["eval", "--checkpoint", "/nonexistent/run/checkpoint"], "not found"),
     (["bench", "--checkpoint", "/nonexistent/run/checkpoint"], "not found"),
     (["train", "--epochs", "x"], "expected a positive integer, got 'x'")],
)  # fmt: skip
def test_usage_errors(argv: list[str], words: str) -> None:
    code, _, err = _assert_clean(argv)
    assert code == 2 and words in err


def test_help_exits_zero() -> None:
    assert _run(["--help"])[0] == 0


def test_macs_negative_num_classes() -> None:
    code, _, err = _assert_clean(["macs", "--model", "cifar_resnet8", "--num-classes", "-1"])
    assert code == 2 and "--num-classes" in err


def test_list_unknown_family() -> None:
    code, _, err = _assert_clean(["list", "recipes", "--family", "nope"])
    assert code == 2 and "family" in err


@pytest.mark.parametrize("damage", ["truncate_weights", "garbage_json", "missing_weights"])
def test_eval_corrupt_checkpoint(tmp_path: Path, damage: str) -> None:
    from dynnet.train import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model("cifar_resnet8", "convnet_aig", width=0.25, in_channels=1)
    stem = tmp_path / "checkpoint"
    save_checkpoint(stem, model)
    weights, meta = tmp_path / "checkpoint.safetensors", tmp_path / "checkpoint.json"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garbage_json":
        meta.write_text("{not json")
    else:
        weights.unlink()
    code, _, err = _assert_clean(["eval", "--checkpoint", str(stem), "--data", "synthetic", "--max-batches", "1"])
    assert code == 2 and "checkpoint" in err
