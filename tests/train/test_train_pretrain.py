"""`dynnet pretrain`: a dense base trained, written as safetensors + a manifest whose hash matches, resumable."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dynnet.models import build_base_model
from dynnet.train.pretrain import pretrain, sha256_of

DATA = {"num_train": 160, "num_test": 64, "in_channels": 1, "image_size": 12}


def test_pretrain_writes_weights_and_a_manifest_that_match(tmp_path) -> None:
    m = pretrain("cifar_resnet8", "synthetic", out_dir=tmp_path, width=0.25, epochs=2, lr=0.1, batch_size=32,
                 dataset_kwargs=DATA, command="dynnet pretrain --test")  # fmt: skip
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == json.loads(json.dumps(m))
    assert manifest["sha256"] == sha256_of(tmp_path / "model.safetensors")
    assert manifest["command"] == "dynnet pretrain --test" and manifest["settings"]["epochs"] == 2
    assert 0.0 <= manifest["test_accuracy"] <= 1.0 and manifest["test_images"] == 64
    net = build_base_model("cifar_resnet8", **manifest["model_kwargs"])
    net.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert net(torch.zeros(2, 1, 12, 12)).shape == (2, 10)
    # Calling again resumes the finished run: no training, the same weights.
    again = pretrain("cifar_resnet8", "synthetic", out_dir=tmp_path, width=0.25, epochs=2, lr=0.1, batch_size=32,
                     dataset_kwargs=DATA, command="dynnet pretrain --test")  # fmt: skip
    assert again["sha256"] == manifest["sha256"]


def test_pretrain_refuses_a_folder_of_another_run(tmp_path) -> None:
    pretrain("cifar_resnet8", "synthetic", out_dir=tmp_path, width=0.25, epochs=1, batch_size=32, dataset_kwargs=DATA)
    with pytest.raises(ValueError, match="other settings \\(epochs\\)"):
        pretrain("cifar_resnet8", "synthetic", out_dir=tmp_path, width=0.25, epochs=3, batch_size=32,
                 dataset_kwargs=DATA)  # fmt: skip
