"""build_loaders: the contract over every registered dataset, splits, determinism, validation, distributed sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

import dynnet
import dynnet.data.fashion_mnist as fashion_mnist
from dynnet.core.registry import UnknownNameError
from dynnet.data import DATASETS, RepeatChannels, build_loaders, split_indices
from dynnet.data.testing import write_fake_cifar, write_fake_fashion_mnist, write_fake_imagefolder

SYNTHETIC: dict[str, Any] = {"num_train": 200, "num_test": 50, "image_size": 8}


@pytest.fixture
def fake_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A root holding tiny versions of every file-backed dataset, and nothing else searchable."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.delenv("DYNNET_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "data"
    write_fake_fashion_mnist(root, num_train=40, num_test=20)
    write_fake_cifar(root, num_classes=10)
    write_fake_cifar(root, num_classes=100)
    write_fake_imagefolder(root, per_class=10, size=(12, 12))
    return root


OPTIONS: dict[str, dict[str, Any]] = {
    "cifar10": {"check_md5": False, "augment": True},
    "cifar100": {"check_md5": False},
    "cluttered_fashion_mnist": {},
    "fashion_mnist": {},
    "imagefolder": {"image_size": 16},
    "synthetic": SYNTHETIC,
}


def test_every_registered_dataset_is_covered() -> None:
    assert set(DATASETS.names()) == set(OPTIONS)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_contract(name: str, fake_root: Path) -> None:
    loaders = build_loaders(name, root=fake_root, batch_size=4, val_fraction=0.2, **OPTIONS[name])
    info = loaders.info
    assert info.name == name and len(info.classes) == info.num_classes
    for loader in (loaders.train, loaders.val, loaders.test):
        x, y = next(iter(loader))
        assert x.shape == (4, info.in_channels, *info.image_size) and x.dtype == torch.float32
        assert y.shape == (4,) and y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) < info.num_classes
        assert torch.isfinite(x).all()


def test_split_sizes_disjoint_and_deterministic() -> None:
    loaders = build_loaders("synthetic", batch_size=32, val_fraction=0.1, seed=5, **SYNTHETIC)
    train_index, val_index = loaders.train.dataset.indices, loaders.val.dataset.indices
    assert (len(train_index), len(val_index), len(loaders.test.dataset)) == (180, 20, 50)
    assert set(train_index).isdisjoint(val_index) and set(train_index) | set(val_index) == set(range(200))
    again = build_loaders("synthetic", batch_size=32, val_fraction=0.1, seed=5, **SYNTHETIC)
    assert again.val.dataset.indices == val_index
    torch.testing.assert_close(next(iter(loaders.train))[0], next(iter(again.train))[0], rtol=0, atol=0)
    other = build_loaders("synthetic", batch_size=32, val_fraction=0.1, seed=6, **SYNTHETIC)
    assert other.val.dataset.indices != val_index


def test_subset_limits_train_only() -> None:
    full = build_loaders("synthetic", val_fraction=0.1, seed=2, **SYNTHETIC)
    small = build_loaders("synthetic", val_fraction=0.1, seed=2, subset=30, **SYNTHETIC)
    assert len(small.train.dataset) == 30 and set(small.train.dataset.indices) <= set(full.train.dataset.indices)
    assert small.val.dataset.indices == full.val.dataset.indices
    assert len(build_loaders("synthetic", subset=10_000, **SYNTHETIC).train.dataset) == 180


def test_no_validation_split() -> None:
    loaders = build_loaders("synthetic", val_fraction=0.0, **SYNTHETIC)
    assert loaders.val is None and len(loaders.train.dataset) == 200


def test_split_indices_edge_cases() -> None:
    train, val = split_indices(10, val_fraction=0.01, seed=0)
    assert len(val) == 1 and len(train) == 9  # a positive fraction keeps at least one sample
    with pytest.raises(ValueError, match="leaves no training sample"):
        split_indices(1, val_fraction=0.5, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "mnist"}, UnknownNameError, "known datasets: cifar10, cifar100"),
        ({"val_fraction": 1.0}, ValueError, r"val_fraction must be in \[0, 1\), got 1.0"),
        ({"val_fraction": -0.1}, ValueError, "val_fraction"),
        ({"subset": 0}, ValueError, "subset must be a positive int, got 0"),
        ({"subset": -3}, ValueError, "subset"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int, got 0"),
        ({"batch_size": 2.5}, ValueError, "batch_size"),
        ({"num_workers": -1}, ValueError, "num_workers"),
        ({"distributed": True}, ValueError, "init_process_group"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    kwargs = {"name": "synthetic", **SYNTHETIC, **kwargs}
    with pytest.raises(error, match=match):
        build_loaders(kwargs.pop("name"), **kwargs)


@pytest.fixture
def process_group(tmp_path: Path):
    """A real single-process gloo group, as torchrun would set up with one worker."""
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_distributed_sampler_when_initialised(process_group: None) -> None:
    loaders = build_loaders("synthetic", batch_size=16, seed=3, **SYNTHETIC)
    sampler = loaders.train.sampler
    assert isinstance(sampler, DistributedSampler) and sampler.num_replicas == 1
    loaders.set_epoch(4)
    assert sampler.epoch == 4
    assert not isinstance(loaders.val.sampler, DistributedSampler)  # every rank evaluates everything
    local = build_loaders("synthetic", distributed=False, **SYNTHETIC)
    assert not isinstance(local.train.sampler, DistributedSampler)


def test_distributed_shards_cover_the_train_split(process_group: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)  # pretend to be one of two ranks
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, rank=rank: rank)
        loaders = build_loaders("synthetic", distributed=True, seed=3, **SYNTHETIC)
        sampler = loaders.train.sampler
        assert (sampler.num_replicas, sampler.rank) == (2, rank)
        shards.append(list(sampler))
        loaders.set_epoch(1)
        assert list(sampler) != shards[-1]  # set_epoch reshuffles
    assert set(shards[0]).isdisjoint(shards[1]) and len(shards[0]) + len(shards[1]) == 180


def test_grey_images_repeated_to_three_channels_feed_an_rgb_network() -> None:
    grey = {**SYNTHETIC, "in_channels": 1, "image_size": 16}
    plain = build_loaders("synthetic", batch_size=8, seed=1, **grey)
    rgb = build_loaders("synthetic", batch_size=8, seed=1, channels=3, **grey)
    info = rgb.info
    assert (info.in_channels, len(info.mean), len(info.std)) == (3, 3, 3) and info.mean == plain.info.mean * 3
    for one, three in ((plain.train, rgb.train), (plain.val, rgb.val), (plain.test, rgb.test)):
        (x1, y1), (x3, y3) = next(iter(one)), next(iter(three))
        assert x3.shape == (8, 3, 16, 16) and x3.is_contiguous()
        torch.testing.assert_close(x3, x1.expand(-1, 3, -1, -1), rtol=0, atol=0)
        assert torch.equal(y1, y3)
    x, _ = rgb.train.dataset[0]  # one item as well as a batch
    assert x.shape == (3, 16, 16)
    # A network made for RGB images (torchvision's) runs on them.
    net = dynnet.create_model("resnet18", num_classes=info.num_classes, in_channels=info.in_channels).eval()
    with torch.no_grad():
        assert net(next(iter(rgb.test))[0]).shape == (8, info.num_classes)


def test_channels_of_a_colour_dataset() -> None:
    same = build_loaders("synthetic", channels=3, **SYNTHETIC)
    assert same.info.in_channels == 3 and not isinstance(same.test.dataset, RepeatChannels)
    with pytest.raises(ValueError, match="only grey"):
        build_loaders("synthetic", channels=1, **SYNTHETIC)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        build_loaders("synthetic", channels=0, **SYNTHETIC)
