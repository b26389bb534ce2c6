"""Fashion-MNIST: the search order, the errors, the mocked download path, and the real Debian files when installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

import dynnet.data.fashion_mnist as fashion_mnist
from dynnet.data import (
    DatasetNotFoundError,
    build_fashion_mnist,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
    write_idx,
)
from dynnet.data.testing import write_fake_fashion_mnist


@pytest.fixture
def no_system_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Hide the Debian files, $DYNNET_DATA and the user's cache, so that only what a test writes can be found."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.delenv("DYNNET_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_reads_flat_gz_files_from_root(no_system_data: Path) -> None:
    root = no_system_data / "data"
    write_fake_fashion_mnist(root, num_train=30, num_test=12)
    images, targets = load_fashion_mnist(root, train=True)
    assert images.shape == (30, 28, 28) and images.dtype == torch.uint8
    assert targets.dtype == torch.int64 and targets.tolist() == [i % 10 for i in range(30)]
    splits = build_fashion_mnist(root=root)
    assert (len(splits.train), len(splits.test)) == (30, 12)
    x, y = splits.test[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3
    raw = read_idx(root / "t10k-images-idx3-ubyte.gz")[3].float() / 255
    torch.testing.assert_close(x[0] * splits.info.std[0] + splits.info.mean[0], raw)
    assert splits.info.num_classes == 10 and splits.info.in_channels == 1 and len(splits.info.classes) == 10


def test_torchvision_layout_with_extracted_files(no_system_data: Path) -> None:
    root = no_system_data / "tv"
    folder = write_fake_fashion_mnist(root, num_train=20, num_test=10, compress=False, layout="torchvision")
    assert folder == root / "FashionMNIST" / "raw"
    images_file, labels_file = find_fashion_mnist(root, train=False)
    assert images_file == folder / "t10k-images-idx3-ubyte" and labels_file.parent == folder
    assert load_fashion_mnist(root, train=True)[0].shape == (20, 28, 28)


def test_env_var_is_searched_after_root(no_system_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_root, explicit = no_system_data / "env", no_system_data / "explicit"
    write_fake_fashion_mnist(env_root, num_train=20, num_test=10)
    monkeypatch.setenv("DYNNET_DATA", str(env_root))
    assert find_fashion_mnist(None)[0].parent == env_root
    assert find_fashion_mnist(explicit)[0].parent == env_root  # falls through an empty explicit root
    write_fake_fashion_mnist(explicit, num_train=10, num_test=10)
    assert find_fashion_mnist(explicit)[0].parent == explicit  # an explicit root wins


def test_missing_data_names_searched_paths_and_the_fix(no_system_data: Path) -> None:
    root = no_system_data / "empty"
    with pytest.raises(DatasetNotFoundError) as info:
        build_fashion_mnist(root=root)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install -y dataset-fashion-mnist" in message and "download=True" in message
    assert str(root) in message and str(root / "FashionMNIST" / "raw") in message
    assert str(no_system_data / "no-debian") in message


def test_disagreeing_files_raise_value_error(no_system_data: Path) -> None:
    root = no_system_data / "bad"
    write_fake_fashion_mnist(root, num_train=20, num_test=10)
    write_idx(root / "train-labels-idx1-ubyte.gz", torch.zeros(19, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"20 images but .* 19 labels"):
        load_fashion_mnist(root, train=True)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", torch.full((10,), 10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="label 10"):
        load_fashion_mnist(root, train=False)


def test_download_delegates_to_torchvision(no_system_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeFashionMNIST:  # stands in for the network: writes what torchvision would extract
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append((root, download))
            write_fake_fashion_mnist(root, num_train=20, num_test=10, compress=False, layout="torchvision")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    root = no_system_data / "downloads"
    with pytest.raises(DatasetNotFoundError):
        load_fashion_mnist(root, download=False)
    assert calls == []
    images, _ = load_fashion_mnist(root, train=False, download=True)
    assert calls == [(str(root), True)] and images.shape == (10, 28, 28)
    load_fashion_mnist(root, train=True, download=True)  # found now: no second download
    assert len(calls) == 1


def test_real_debian_files() -> None:
    if not fashion_mnist.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    train_images, train_targets = load_fashion_mnist(fashion_mnist.DEBIAN_FASHION_MNIST, train=True)
    test_images, test_targets = load_fashion_mnist(fashion_mnist.DEBIAN_FASHION_MNIST, train=False)
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert train_targets.shape == (60000,) and test_targets.shape == (10000,)
    assert int(train_targets.min()) == 0 and int(train_targets.max()) == 9
    assert torch.bincount(train_targets).tolist() == [6000] * 10
    assert torch.bincount(test_targets).tolist() == [1000] * 10
    mean = train_images.float().div(255).mean().item()
    assert mean == pytest.approx(fashion_mnist.FASHION_MNIST_MEAN[0], abs=1e-3)
