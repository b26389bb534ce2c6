"""CIFAR-10/100 from tiny files in torchvision's exact on-disk format (Python 2 pickles with b"data" keys)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dynnet.data import DatasetNotFoundError, build_cifar, build_loaders, load_cifar, random_crop_flip
from dynnet.data.cifar import CIFAR10_MEAN, CIFAR10_STD
from dynnet.data.testing import write_fake_cifar


@pytest.fixture
def no_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("DYNNET_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_fake_files_look_like_the_real_ones(no_env: Path) -> None:
    folder = write_fake_cifar(no_env, per_batch=4)
    with open(folder / "data_batch_2", "rb") as f:
        entry = pickle.load(f, encoding="bytes")  # the CIFAR web page's recipe
    assert entry[b"data"].shape == (4, 3072) and entry[b"data"].dtype == np.uint8
    assert entry[b"labels"] == [4, 5, 6, 7]


def test_cifar10_pixels_labels_and_classes(no_env: Path) -> None:
    folder = write_fake_cifar(no_env, per_batch=4, num_test=6)
    images, targets, classes = load_cifar(no_env, train=True, check_md5=False)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert targets.tolist() == [i % 10 for i in range(20)]
    assert classes == tuple(f"class{i}" for i in range(10))
    with open(folder / "data_batch_1", "rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][1]
    # One row: 1024 red values (32 rows of 32), then green, then blue.
    torch.testing.assert_close(images[1], torch.from_numpy(row.reshape(3, 32, 32)), rtol=0, atol=0)
    test_images, test_targets, _ = load_cifar(no_env, train=False, check_md5=False)
    assert test_images.shape == (6, 3, 32, 32) and test_targets.shape == (6,)


def test_cifar100_fine_labels(no_env: Path) -> None:
    write_fake_cifar(no_env, num_classes=100, per_batch=6, num_test=5)
    splits = build_cifar(num_classes=100, root=no_env, check_md5=False)
    assert (len(splits.train), len(splits.test)) == (30, 5)
    assert splits.info.num_classes == 100 and splits.info.classes[99] == "fine99"
    assert splits.train.targets.tolist() == list(range(30))
    x, y = splits.train[7]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 7


def test_md5_checked_by_default(no_env: Path) -> None:
    write_fake_cifar(no_env)
    with pytest.raises(ValueError, match="check_md5=False"):
        load_cifar(no_env)


def test_missing_cifar_raises_dataset_not_found(no_env: Path) -> None:
    write_fake_cifar(no_env)
    (no_env / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="download=True") as info:
        load_cifar(no_env, check_md5=False)
    assert str(no_env / "cifar-10-batches-py") in str(info.value) and "data_batch_3" in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        load_cifar(no_env, num_classes=100, check_md5=False)


def test_normalisation_is_invertible(no_env: Path) -> None:
    write_fake_cifar(no_env)
    splits = build_cifar(root=no_env, check_md5=False)
    x, _ = splits.test.batch([0, 1, 2])
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x * std + mean, splits.test.images[:3].float() / 255)


def test_augmentation_on_train_only(no_env: Path) -> None:
    write_fake_cifar(no_env, per_batch=8)
    torch.manual_seed(0)
    loaders = build_loaders(
        "cifar10", root=no_env, check_md5=False, augment=True, batch_size=40, val_fraction=0.25, seed=1
    )
    dataset = loaders.train.dataset.dataset
    assert dataset.augment and not loaders.val.dataset.dataset.augment
    x, _ = dataset.batch(torch.arange(40))
    clean, _ = dataset.with_augment(False).batch(torch.arange(40))
    assert x.shape == clean.shape and not torch.equal(x, clean)
    v1, _ = next(iter(loaders.val))
    v2, _ = next(iter(loaders.val))
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)


def test_random_crop_flip_is_a_window_of_the_padded_image() -> None:
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, pad=2, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        windows = [
            padded[i, :, dy : dy + 8, dx : dx + 8].flip(-1) if flip else padded[i, :, dy : dy + 8, dx : dx + 8]
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
        ]
        assert any(torch.equal(out[i], w) for w in windows)
    flips_only = random_crop_flip(x, pad=0, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(flips_only[i], x[i]) or torch.equal(flips_only[i], x[i].flip(-1)) for i in range(6))
