"""Resume after ``kill -9``: a training process killed mid-epoch resumes from its last checkpoint and ends with
exactly the weights of an uninterrupted run (no lost epoch, no lost step).

The killed run is a real subprocess that sends itself SIGKILL (no ``finally``, no ``atexit``, no flush), once
after a step and once in the middle of writing a checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("dynnet.train")

from dynnet.data import build_loaders
from dynnet.train import TrainConfig, build_model, fit, load_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")

# 96 synthetic images, 16 held out, batches of 16: 5 steps per epoch, 2 epochs.
DATA = {"batch_size": 16, "subset": 80, "in_channels": 1, "image_size": 12, "num_train": 96}
CONFIG = {"epochs": 2, "lr": 0.05, "checkpoint_every_steps": 1, "tau_start": 2.0, "tau_end": 0.5, "log_every": 1000}
MODEL = {"name": "cifar_resnet8", "recipe": "convnet_aig", "width": 0.25, "in_channels": 1, "num_classes": 10}

# The child trains with the same code as the parent and kills itself at a chosen point.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from dynnet.data import build_loaders
    from dynnet.train import Hook, TrainConfig, build_model, fit
    import dynnet.train.checkpoint as ckpt

    out, where, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    DATA, CONFIG, MODEL = {data!r}, {config!r}, {model!r}
    state = {{"step": 0}}

    class KillAfterStep(Hook):
        def on_step_end(self, s):
            state["step"] = s.step
            if where == "after_step" and s.step == at:
                os.kill(os.getpid(), signal.SIGKILL)

    write = ckpt._atomic_write
    def dying_write(path, data):
        # kill -9 between the data files and the JSON commit marker of the checkpoint written after step `at`
        if where == "mid_checkpoint" and state["step"] == at and path.suffix == ".json":
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, data)
    ckpt._atomic_write = dying_write

    torch.manual_seed(0)
    model = build_model(MODEL.pop("name"), **MODEL)
    loaders = build_loaders("synthetic", **DATA)
    fit(model, loaders.train, TrainConfig(**CONFIG, out_dir=out), hooks=[KillAfterStep()])
    sys.exit(3)  # never reached: the process was killed
    """
).format(data=DATA, config=CONFIG, model=MODEL)


def _model():
    torch.manual_seed(0)
    kw = dict(MODEL)
    return build_model(kw.pop("name"), **kw)


def _train(out: Path, *, resume: bool = False):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child: the same reductions, bit for bit
    try:
        model = _model()
        loaders = build_loaders("synthetic", **DATA)
        result = fit(model, loaders.train, TrainConfig(**CONFIG, out_dir=str(out), resume=resume))
    finally:
        torch.set_num_threads(threads)
    return model, result


def _kill_child(out: Path, where: str, at: int) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(out), where, str(at)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, f"child exited with {proc.returncode}: {proc.stderr[-2000:]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    model, result = _train(tmp_path_factory.mktemp("full"))
    assert [h["step"] for h in result.history] == [5, 10]
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(tmp_path: Path, uninterrupted) -> None:
    # killed at the end of step 7 of 10 (epoch 1, batch 2), before that step's checkpoint: at most the step in
    # flight is lost (checkpoints every step)
    _kill_child(tmp_path, "after_step", at=7)
    _, meta = load_checkpoint(tmp_path / "checkpoint", _model())
    s = meta["state"]
    assert (s["epoch"], s["batch_in_epoch"], s["step"]) == (1, 1, 6)
    model, result = _train(tmp_path, resume=True)
    _assert_same(model.state_dict(), uninterrupted)
    assert [h["epoch"] for h in result.history] == [0, 1]


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint_then_resume(tmp_path: Path, uninterrupted) -> None:
    _kill_child(tmp_path, "mid_checkpoint", at=7)
    _, meta = load_checkpoint(tmp_path / "checkpoint", _model())
    assert meta["state"]["step"] == 6  # the previous checkpoint is intact
    model, _ = _train(tmp_path, resume=True)
    _assert_same(model.state_dict(), uninterrupted)
