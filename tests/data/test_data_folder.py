"""ImageFolder in the ImageNet layout, from a few tiny PNG and JPEG files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from dynnet.data import DatasetNotFoundError, build_imagefolder, build_loaders, imagefolder_transforms
from dynnet.data.testing import write_fake_imagefolder


def test_splits_shapes_and_classes(tmp_path: Path) -> None:
    write_fake_imagefolder(tmp_path, classes=("cat", "dog"), per_class=3, size=(20, 24))
    splits = build_imagefolder(root=tmp_path, image_size=16)
    assert splits.info.classes == ("cat", "dog") and splits.info.image_size == (16, 16)
    assert (len(splits.train), len(splits.train_eval), len(splits.test)) == (6, 6, 6)
    assert splits.train.samples == splits.train_eval.samples  # same files, same order: val indices line up
    x, y = splits.train[4]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    e1, _ = splits.train_eval[0]
    e2, _ = splits.train_eval[0]
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)  # evaluation transform is deterministic


def test_loaders_over_imagefolder(tmp_path: Path) -> None:
    write_fake_imagefolder(tmp_path, per_class=4)
    loaders = build_loaders("imagefolder", root=tmp_path, image_size=16, batch_size=3, val_fraction=0.25)
    x, y = next(iter(loaders.train))
    assert x.shape == (3, 3, 16, 16) and y.dtype == torch.int64
    assert len(loaders.val.dataset) == 2 and len(loaders.test.dataset) == 8


def test_eval_transform_resizes_then_center_crops() -> None:
    _, evaluation = imagefolder_transforms(image_size=8, resize_size=10, mean=(0, 0, 0), std=(1, 1, 1))
    image = Image.new("RGB", (40, 20), color=(255, 0, 0))
    out = evaluation(image)
    assert out.shape == (3, 8, 8)
    torch.testing.assert_close(out[0], torch.ones(8, 8))
    with pytest.raises(ValueError, match="resize_size"):
        imagefolder_transforms(image_size=8, resize_size=4)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs root="):
        build_imagefolder()
    with pytest.raises(ValueError, match="cannot be downloaded"):
        build_imagefolder(root=tmp_path, download=True)
    with pytest.raises(DatasetNotFoundError, match="val"):
        write_fake_imagefolder(tmp_path / "a")
        shutil.rmtree(tmp_path / "a" / "val")
        build_imagefolder(root=tmp_path / "a")
    write_fake_imagefolder(tmp_path / "b", classes=("cat", "dog"))
    shutil.rmtree(tmp_path / "b" / "val" / "dog")
    with pytest.raises(ValueError, match="same class folders"):
        build_imagefolder(root=tmp_path / "b")
    (tmp_path / "c" / "train").mkdir(parents=True)
    (tmp_path / "c" / "val").mkdir()
    with pytest.raises(DatasetNotFoundError):
        build_imagefolder(root=tmp_path / "c")
