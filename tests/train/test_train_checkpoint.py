"""Checkpoints: exact round trip, rebuild from JSON, atomic writes, corrupt files, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from torch import nn

import dynnet
from dynnet.data import build_loaders
from dynnet.train import (
    CheckpointError,
    Hook,
    TrainConfig,
    build_model,
    build_optimizer,
    fit,
    load_checkpoint,
    save_checkpoint,
)
from dynnet.train import checkpoint as ckpt_module


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cifar_resnet8", recipe="convnet_aig", budget=0.4, width=0.25, in_channels=1, hidden=8)


def _trained_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    opt = build_optimizer(model, TrainConfig(lr=0.1))
    x = torch.randn(4, 1, 12, 12)
    for _ in range(2):
        with dynnet.trace() as t:
            logits = model(x)
        model.compute_loss(logits, torch.tensor([0, 1, 2, 3]), t).total.backward()
        opt.step()
        opt.zero_grad()
    return opt


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            _assert_same_state(a[k], b[k])
        else:
            assert a[k] == b[k], k


def test_round_trip_weights_and_optimizer_exactly(tmp_path: Path) -> None:
    model = _model()
    opt = _trained_optimizer(model)
    path = save_checkpoint(tmp_path / "ck", model, optimizer=opt, state={"epoch": 3, "step": 7, "extra": torch.ones(2)})
    assert path == tmp_path / "ck.json"
    assert (tmp_path / "ck.safetensors").is_file() and (tmp_path / "ck.optim.safetensors").is_file()

    fresh = _model(seed=1)
    fresh_opt = build_optimizer(fresh, TrainConfig(lr=0.1))
    loaded, meta = load_checkpoint(tmp_path / "ck.safetensors", fresh, optimizer=fresh_opt)
    assert loaded is fresh
    _assert_same_state(model.state_dict(), fresh.state_dict())
    _assert_same_state(opt.state_dict()["state"], fresh_opt.state_dict()["state"])
    assert opt.state_dict()["param_groups"] == fresh_opt.state_dict()["param_groups"]
    assert meta["state"]["epoch"] == 3 and torch.equal(meta["state"]["extra"], torch.ones(2))
    assert meta["recipe"] == "convnet_aig" and meta["recipe_config"]["budget"] == 0.4
    assert meta["dynnet_version"] == dynnet.__version__


def test_load_rebuilds_the_model_from_json(tmp_path: Path) -> None:
    model = _model()
    save_checkpoint(tmp_path / "ck", model)
    rebuilt, _ = load_checkpoint(tmp_path / "ck")
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    _assert_same_state(model.state_dict(), rebuilt.state_dict())
    x = torch.randn(3, 1, 12, 12)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_shared_tensors_are_stored_once(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight  # tied
    save_checkpoint(tmp_path / "tied", model)
    other = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    load_checkpoint(tmp_path / "tied", other)
    assert torch.equal(other[0].weight, model[0].weight) and torch.equal(other[1].weight, model[0].weight)
    assert json.loads((tmp_path / "tied.json").read_text())["aliases"] == {"1.weight": "0.weight"}


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    save_checkpoint(tmp_path / "ck", model, state={"step": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_write = ckpt_module._atomic_write
    calls = []

    def failing_write(path: Path, data: bytes) -> None:
        calls.append(path.name)
        if path.suffix == ".json":  # the weights were replaced, then the commit marker fails
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(ckpt_module, "_atomic_write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ck", model, state={"step": 2})
    monkeypatch.setattr(ckpt_module, "_atomic_write", real_write)
    assert calls == ["ck.safetensors", "ck.json"]
    assert (tmp_path / "ck.json").read_bytes() == before["ck.json"]  # the commit marker is the old one
    # ... and loading gives the previous checkpoint (its data was kept as .prev), never the uncommitted weights
    previous, meta = load_checkpoint(tmp_path / "ck", _model())
    assert meta["state"]["step"] == 1
    old = _model()
    old.load_state_dict(st_load(before["ck.safetensors"]), strict=True)
    for (k, a), b in zip(previous.state_dict().items(), old.state_dict().values(), strict=True):
        assert torch.equal(a, b), k

    # a failure while writing the data file itself (killed mid-write) leaves every old file as it was
    save_checkpoint(tmp_path / "ok", model, state={"step": 3})
    ok_before = {p.name: p.read_bytes() for p in tmp_path.glob("ok.*")}

    def crash_mid_write(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_module.os, "fsync", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ok", _model(seed=5), state={"step": 4})
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in tmp_path.glob("ok.*")}
    assert {k: after[k] for k in ok_before} == ok_before  # every committed file as it was
    assert set(after) - set(ok_before) <= {"ok.safetensors.prev"}  # plus, at most, the backup of its data
    assert not list(tmp_path.glob(".*.tmp"))  # temporary files cleaned up
    _, meta = load_checkpoint(tmp_path / "ok", _model())
    assert meta["state"]["step"] == 3


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_weights", "bad_json", "truncate_json", "missing"])
def test_corrupt_checkpoint_raises_naming_the_file(tmp_path: Path, damage: str) -> None:
    model = _model()
    save_checkpoint(tmp_path / "ck", model)
    weights, meta = tmp_path / "ck.safetensors", tmp_path / "ck.json"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:100])
        name = "ck.safetensors"
    elif damage == "flip_weights":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
        name = "ck.safetensors"
    elif damage == "bad_json":
        meta.write_text("{not json")
        name = "ck.json"
    elif damage == "truncate_json":
        meta.write_bytes(meta.read_bytes()[:50])
        name = "ck.json"
    else:
        weights.unlink()
        name = "ck.safetensors"
    with pytest.raises(CheckpointError, match=name) as info:
        load_checkpoint(tmp_path / "ck", _model())
    assert isinstance(info.value, ValueError)


def test_mismatched_model_raises(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ck", _model())
    other = dynnet.create_model("cifar_resnet8", recipe="convnet_aig", width=0.5, in_channels=1)
    with pytest.raises(CheckpointError, match=r"ck\.json.*does not match"):
        load_checkpoint(tmp_path / "ck", other)


def test_wrong_architecture_is_one_short_line(tmp_path: Path) -> None:
    """Another architecture differs in dozens of keys: count them and show a few, not every key name."""
    save_checkpoint(tmp_path / "ck", _model())
    other = dynnet.create_model("cifar_resnet20", recipe="skipnet", in_channels=1)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "ck", other)
    message = str(info.value)
    assert "\n" not in message and len(message) < 1200, message
    missing = len(other.state_dict().keys() - _model().state_dict().keys())
    assert f"{missing} missing keys" in message and "unexpected keys" in message and "more)" in message
    shapes = dynnet.create_model("cifar_resnet8", recipe="convnet_aig", width=0.5, in_channels=1, hidden=8)
    with pytest.raises(CheckpointError, match=r"keys of another shape, checkpoint vs model \(net\.conv1\.weight"):
        load_checkpoint(tmp_path / "ck", shapes)


class _Crash(Hook):
    """Simulates a crash (e.g. a killed job) right after step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, state) -> None:
        if state.step == self.at:
            raise KeyboardInterrupt


def test_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # Gumbel noise draws random numbers in every step: resume must restore the RNG states, the shuffling
    # order, the optimiser (momentum), the LR scheduler and the tau schedule's position.
    loaders = build_loaders("synthetic", batch_size=16, subset=80, in_channels=1, image_size=12, num_train=96)
    config = TrainConfig(epochs=2, lr=0.05, checkpoint_every_steps=3, tau_start=2.0, tau_end=0.5)

    full = _model()
    fit(full, loaders.train, TrainConfig(**{**config.as_dict(), "out_dir": str(tmp_path / "full")}))

    run_dir = tmp_path / "interrupted"
    crashed = _model()
    cfg = TrainConfig(**{**config.as_dict(), "out_dir": str(run_dir)})
    with pytest.raises(KeyboardInterrupt):
        fit(crashed, loaders.train, cfg, hooks=[_Crash(at=7)])  # step 7: mid epoch 1 (5 batches per epoch)
    _, meta = load_checkpoint(run_dir / "checkpoint", _model())
    assert (meta["state"]["epoch"], meta["state"]["batch_in_epoch"], meta["state"]["step"]) == (1, 1, 6)

    resumed = _model(seed=123)  # different initial weights: everything must come from the checkpoint
    result = fit(resumed, loaders.train, TrainConfig(**{**cfg.as_dict(), "resume": True}))
    _assert_same_state(full.state_dict(), resumed.state_dict())
    assert [h["step"] for h in result.history] == [5, 10]
