"""The synthetic dataset: any shape, deterministic from its seed, and learnable."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynnet.data import build_synthetic, make_synthetic


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(0, 40),
    num_classes=st.integers(1, 12),
    channels=st.integers(1, 4),
    height=st.integers(1, 20),
    width=st.integers(1, 20),
)
def test_any_shape_and_balanced_targets(n: int, num_classes: int, channels: int, height: int, width: int) -> None:
    images, targets = make_synthetic(n, num_classes=num_classes, in_channels=channels, image_size=(height, width))
    assert images.shape == (n, channels, height, width) and images.dtype == torch.uint8
    assert targets.shape == (n,) and targets.dtype == torch.int64
    counts = torch.bincount(targets, minlength=num_classes)
    assert int(counts.max() - counts.min()) <= 1


def test_deterministic_from_seed() -> None:
    a = make_synthetic(64, seed=3)
    b = make_synthetic(64, seed=3)
    c = make_synthetic(64, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(make_synthetic(64, seed=3, split=1)[0], a[0])


def test_learnable_by_nearest_class_mean() -> None:
    splits = build_synthetic(num_train=500, num_test=200, image_size=16, data_seed=1)
    x_train, y_train = splits.train.batch(torch.arange(len(splits.train)))
    x_test, y_test = splits.test.batch(torch.arange(len(splits.test)))
    means = torch.stack([x_train[y_train == k].mean(0) for k in range(10)]).flatten(1)
    predicted = torch.cdist(x_test.flatten(1), means).argmin(1)
    assert (predicted == y_test).float().mean() > 0.9  # test samples share the training patterns


def test_builder_info_and_normalisation() -> None:
    splits = build_synthetic(num_train=300, num_test=30, num_classes=4, in_channels=2, image_size=(8, 12))
    info = splits.info
    assert (info.num_classes, info.in_channels, info.image_size) == (4, 2, (8, 12))
    x, _ = splits.train.batch(torch.arange(300))
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(2), atol=1e-3, rtol=0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(4, num_classes=0)
    with pytest.raises(ValueError, match="noise"):
        make_synthetic(4, noise=-1.0)
