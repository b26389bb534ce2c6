"""`run_experiment`: the main job end to end on a tiny synthetic problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynnet.bench.experiment import run_experiment
from dynnet.train import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_run_experiment_end_to_end(tmp_path: Path) -> None:
    result = run_experiment(
        "cifar_resnet8", "convnet_aig", budget=0.5, dataset="synthetic", epochs=1, batch_size=32, lr=0.1,
        subset=64, out_dir=tmp_path, batch_sizes=(1, 4), min_run_time=0.01, model_kwargs={"width": 0.25},
        dataset_kwargs={"in_channels": 1, "image_size": 12, "num_train": 96, "num_test": 40},
    )  # fmt: skip
    assert result.test.num_samples == 40 and result.test.mode == "sparse"
    assert result.masked_accuracy == result.test.accuracy and result.sparse_masked_agreement == 1.0
    assert result.settings["train_images"] == 64
    assert {"b1_realized_ratio", "b4_realized_ratio", "dense_macs"} <= set(result.profile)
    assert result.profile["dense_macs"] == pytest.approx(result.test.dense_macs)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test"]["accuracy"] == result.test.accuracy
    assert "loadavg_1m" in saved["machine"] and saved["settings"]["recipe"] == "convnet_aig"
    text = result.summary()
    assert "test accuracy (sparse)" in text and "realized ratio" in text and "load average" in text

    model, meta = load_checkpoint(result.checkpoint)  # rebuilt from the JSON alone
    assert meta["recipe"] == "convnet_aig" and model.in_channels == 1
