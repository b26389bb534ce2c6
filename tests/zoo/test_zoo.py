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


SHIPPED = sorted(zoo.shipped())


@pytest.mark.parametrize("key", SHIPPED)
def test_every_shipped_entry_has_its_manifest_matches_its_hash_and_loads(key: str) -> None:
    manifest = zoo.shipped()[key]
    for field in ("command", "data", "settings", "test_accuracy", "test_images", "date", "sha256", "torch"):
        assert manifest.get(field) is not None, f"{key}: manifest lacks {field}"
    assert manifest["command"].startswith(("dynnet pretrain ", "dynnet prune "))
    net = zoo.load(key)  # raises on a hash mismatch or weights that do not fit
    x = torch.randn(2, manifest["model_kwargs"]["in_channels"], 28, 28)
    assert net(x).shape == (2, manifest["model_kwargs"]["num_classes"])


@pytest.mark.slow
@pytest.mark.parametrize("key", SHIPPED)
def test_every_shipped_entry_reaches_its_stated_accuracy_on_a_test_subset(key: str) -> None:
    from dynnet.data import build_loaders
    from dynnet.train import evaluate

    manifest = zoo.shipped()[key]
    loaders = build_loaders(manifest["data"], batch_size=500, val_fraction=0.0, seed=0)
    subset = torch.utils.data.Subset(loaders.test.dataset, range(2000))
    result = evaluate(zoo.load(key), torch.utils.data.DataLoader(subset, batch_size=500), mode="dense")
    stated = manifest["test_accuracy"]
    se = (stated * (1 - stated) / 2000) ** 0.5
    assert result.accuracy >= stated - 3 * se, f"{key}: {result.accuracy:.4f} on 2,000 test images, stated {stated}"
