"""Shipped weights: ship a pretraining run, load it by name with its hash checked, refuse what does not match."""

from __future__ import annotations

import pytest
import torch

import dynnet
import dynnet.zoo as zoo
from dynnet.train.pretrain import pretrain

DATA = {"num_train": 96, "num_test": 32, "in_channels": 1, "image_size": 12}


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    d = tmp_path / "weights"
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", d)
    return d


@pytest.fixture
def run(tmp_path):
    out = tmp_path / "run"
    pretrain("cifar_resnet8", "synthetic", out_dir=out, width=0.25, epochs=1, batch_size=32, dataset_kwargs=DATA)
    return out


def test_ship_then_create_model_pretrained_loads_the_same_weights(run, weights_dir) -> None:
    target = zoo.ship(run)
    assert target.name == "cifar_resnet8x0.25-synthetic.safetensors"
    assert set(zoo.shipped()) == {"cifar_resnet8x0.25-synthetic"}
    with pytest.raises(ValueError, match="exists"):
        zoo.ship(run)
    net = dynnet.create_model("cifar_resnet8", pretrained="synthetic", width=0.25)
    from safetensors.torch import load_file

    expected = load_file(str(run / "model.safetensors"))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    converted = dynnet.create_model("cifar_resnet8", "convnet_aig", budget=0.5, pretrained="synthetic", width=0.25)
    x = torch.randn(3, 1, 12, 12)
    torch.testing.assert_close(converted.eval()(x), net.eval()(x))  # gates start open on the trained base


def test_pretrained_errors_are_one_clear_line(run, weights_dir) -> None:
    with pytest.raises(ValueError, match="no shipped weights 'cifar_resnet8-synthetic'; shipped: none"):
        dynnet.create_model("cifar_resnet8", pretrained="synthetic")
    zoo.ship(run)
    with pytest.raises(ValueError, match="trained with"):
        dynnet.create_model("cifar_resnet8", pretrained="synthetic", width=0.25, in_channels=3)
    path = weights_dir / "cifar_resnet8x0.25-synthetic.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its manifest"):
        dynnet.create_model("cifar_resnet8", pretrained="synthetic", width=0.25)
