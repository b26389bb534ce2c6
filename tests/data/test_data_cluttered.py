"""Cluttered canvases: shape, determinism per index, the item and its box inside the canvas, clutter present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynnet.data import ClutteredCanvasDataset, build_cluttered_fashion_mnist
from dynnet.data.testing import write_fake_fashion_mnist


def _items(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i in range(n):  # a bright rectangle at a known place inside the 28 × 28 patch
        top, left = (int(v) for v in torch.randint(0, 14, (2,), generator=gen))
        images[i, top : top + 10, left : left + 12] = 200
    return images, torch.arange(n) % 10


def _nonzero_box(image: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(image, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.mark.parametrize("canvas_size", [64, 96])
def test_shape_and_item_inside_canvas(canvas_size: int) -> None:
    images, targets = _items()
    dataset = ClutteredCanvasDataset(images, targets, canvas_size=canvas_size, num_clutter=0)
    raw = dataset.uint8_batch(torch.arange(len(dataset)))
    assert raw.shape == (12, 1, canvas_size, canvas_size)
    x, y = dataset[5]
    assert x.shape == (1, canvas_size, canvas_size) and x.dtype == torch.float32 and y == 5
    for i in range(len(dataset)):
        top, left = dataset.positions[i].tolist()
        assert 0 <= top <= canvas_size - 28 and 0 <= left <= canvas_size - 28
        torch.testing.assert_close(raw[i, 0, top : top + 28, left : left + 28], images[i], rtol=0, atol=0)
        assert int(raw[i].sum()) == int(images[i].sum())  # without clutter nothing else is drawn
        assert dataset.box(i).tolist() == _nonzero_box(raw[i, 0])


def test_default_clutter_counts() -> None:
    images, targets = _items()
    assert ClutteredCanvasDataset(images, targets).num_clutter == 4
    assert ClutteredCanvasDataset(images, targets, canvas_size=96).num_clutter == 8


def test_clutter_comes_from_other_items() -> None:
    # Item j is uniformly 40 * (j + 1): every fragment is visible and tells which item it was cut from.
    images = (torch.arange(1, 7, dtype=torch.uint8) * 40).view(6, 1, 1).expand(6, 28, 28).contiguous()
    dataset = ClutteredCanvasDataset(images, torch.arange(6), canvas_size=64, num_clutter=4)
    raw = dataset.uint8_batch(torch.arange(6))[:, 0]
    for i in range(6):
        top, left = dataset.positions[i].tolist()
        outside = raw[i].clone()
        outside[top : top + 28, left : left + 28] = 0
        values = set(outside.unique().tolist()) - {0}
        assert values and values <= {40 * (j + 1) for j in range(6) if j != i}


def test_deterministic_per_index_and_seed() -> None:
    images, targets = _items(20)
    a = ClutteredCanvasDataset(images, targets, seed=7)
    b = ClutteredCanvasDataset(images, targets, seed=7)
    index = torch.tensor([13, 2, 2, 19])
    torch.testing.assert_close(a.batch(index)[0], b.batch(index.flip(0))[0].flip(0), rtol=0, atol=0)
    torch.testing.assert_close(a[13][0], a.batch([0, 13])[0][1], rtol=0, atol=0)  # batch composition is irrelevant
    c = ClutteredCanvasDataset(images, targets, seed=8)
    d = ClutteredCanvasDataset(images, targets, seed=7, split=1)
    all_index = torch.arange(20)
    assert not torch.equal(a.uint8_batch(all_index), c.uint8_batch(all_index))
    assert not torch.equal(a.uint8_batch(all_index), d.uint8_batch(all_index))


def test_bad_arguments() -> None:
    images, targets = _items()
    with pytest.raises(ValueError, match="canvas_size"):
        ClutteredCanvasDataset(images, targets, canvas_size=20)
    with pytest.raises(ValueError, match="clutter_size"):
        ClutteredCanvasDataset(images, targets, clutter_size=40)
    with pytest.raises(ValueError, match="at least 2 items"):
        ClutteredCanvasDataset(images[:1], targets[:1])
    with pytest.raises(ValueError, match="does not augment"):
        ClutteredCanvasDataset(images, targets).with_augment(True)


def test_builder_from_fashion_mnist_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYNNET_DATA", raising=False)
    write_fake_fashion_mnist(tmp_path, num_train=30, num_test=10)
    splits = build_cluttered_fashion_mnist(root=tmp_path, canvas_size=96, data_seed=3)
    assert splits.info.image_size == (96, 96) and splits.info.in_channels == 1
    assert (len(splits.train), len(splits.test)) == (30, 10)
    assert splits.train.num_clutter == 8 and splits.test.mean == splits.train.mean
    x, y = splits.train.batch([0, 1, 2])
    assert x.shape == (3, 1, 96, 96) and y.tolist() == [0, 1, 2]
    boxes = splits.test.boxes
    assert bool((boxes[:, :2] >= 0).all()) and bool((boxes[:, 2:] <= 96).all())
    assert bool((boxes[:, 2:] > boxes[:, :2]).all())
