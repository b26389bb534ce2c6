"""One entry point from a dataset name to train / val / test data loaders."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from dynnet.data._base import DATASETS, DatasetInfo, DatasetSplits

__all__ = ["Loaders", "RepeatChannels", "build_datasets", "build_loaders", "repeat_channels", "split_indices"]


@dataclass
class Loaders:
    """The three loaders of a dataset and what a model needs to know about it.

    Attributes:
        train: shuffled batches ``(Tensor[B, C, H, W] float32, Tensor[B] int64)`` of the training split (less the
            validation samples, limited to ``subset``); sharded by a ``DistributedSampler`` when distributed.
        val: the validation samples carved out of the training split (no augmentation, not shuffled), or ``None``
            when ``val_fraction == 0``.
        test: the held-out split, not shuffled.
        info: the dataset's :class:`DatasetInfo`.
    """

    train: DataLoader
    val: DataLoader | None
    test: DataLoader
    info: DatasetInfo

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the distributed training shards for ``epoch``; a no-op when not distributed.

        A ``DistributedSampler`` draws the same order every epoch unless told the epoch: the training loop must call
        this (or ``loaders.train.sampler.set_epoch``) at the start of every epoch.
        """
        sampler = self.train.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)


class RepeatChannels(Dataset):
    """A dataset of grey images served with their one channel repeated: ``(Tensor[channels, H, W], target)`` items.

    What a network made for RGB images (torchvision's, ``in_channels=3``) needs to run on Fashion-MNIST. The images
    are normalised before they are repeated, so the repeated channels keep the grey dataset's mean and std.

    Args:
        dataset: items ``(Tensor[1, H, W], target)``; its ``__getitems__`` (a whole batch at once) is kept.
        channels: ``C`` of the items served.
    """

    def __init__(self, dataset: Dataset, channels: int) -> None:
        _check_positive_int("channels", channels)
        self.dataset = dataset
        self.channels = channels

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _repeat(self, item: tuple[torch.Tensor, Any]) -> tuple[torch.Tensor, Any]:
        x, y = item
        if x.dim() != 3 or x.shape[0] != 1:
            raise ValueError(f"RepeatChannels repeats 1-channel images Tensor[1, H, W], got {tuple(x.shape)}")
        return x.expand(self.channels, -1, -1), y

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        return self._repeat(self.dataset[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, Any]]:
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(indices) if callable(getitems) else [self.dataset[i] for i in indices]
        return [self._repeat(item) for item in items]


def repeat_channels(splits: DatasetSplits, channels: int | None) -> DatasetSplits:
    """``splits`` with ``channels`` channels per image: grey images repeated (:class:`RepeatChannels`).

    Args:
        splits: what a dataset builder returned.
        channels: ``None`` or the dataset's own channel count: ``splits`` unchanged; more than 1 for a 1-channel
            dataset: its images repeated, and its :class:`DatasetInfo` (``in_channels``, ``mean``, ``std``) with them.

    Raises:
        ValueError: ``channels`` asked of a dataset with more than one channel, or ``channels`` not a positive int.
    """
    info = splits.info
    if channels is None or channels == info.in_channels:
        return splits
    _check_positive_int("channels", channels)
    if info.in_channels != 1:
        raise ValueError(
            f"channels={channels} asked of {info.name}, whose images have {info.in_channels} channels: only grey "
            "(1-channel) images can be repeated to more channels"
        )
    info = dataclasses.replace(info, in_channels=channels, mean=info.mean * channels, std=info.std * channels)
    return DatasetSplits(
        train=RepeatChannels(splits.train, channels), train_eval=RepeatChannels(splits.train_eval, channels),
        test=RepeatChannels(splits.test, channels), info=info,
    )  # fmt: skip


def build_datasets(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    channels: int | None = None,
    **kw: Any,
) -> DatasetSplits:
    """Build the datasets registered as ``name`` in :data:`DATASETS`.

    Args:
        name: a registered name (``DATASETS.names()``).
        root: where to look for the files first.
        download: let torchvision download missing files (needs internet).
        channels: channels of the images served; ``3`` repeats a grey dataset's images for an RGB network
            (:func:`repeat_channels`); ``None``: the dataset's own.
        **kw: the builder's own options (e.g. ``augment=True`` for CIFAR, ``canvas_size=96``).

    Returns:
        :class:`DatasetSplits`.

    Raises:
        UnknownNameError: listing the registered names.
        ValueError: ``channels`` other than the dataset's own for a dataset that is not grey.
    """
    return repeat_channels(DATASETS.get(name)(root=root, download=download, **kw), channels)


def split_indices(
    num_samples: int, *, val_fraction: float, seed: int, subset: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministically split ``range(num_samples)`` into training and validation indices.

    Args:
        num_samples: size of the training split.
        val_fraction: fraction in ``[0, 1)`` set aside for validation; when positive at least one sample.
        seed: fixes the permutation.
        subset: keep only the first ``subset`` training indices of the permutation (all if ``None`` or larger).

    Returns:
        ``(train_index, val_index)``: disjoint ``Tensor[n_train]``, ``Tensor[n_val]`` ``int64``. The validation
        indices depend on ``seed`` and ``val_fraction`` only, never on ``subset``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if subset is not None:
        _check_positive_int("subset", subset)
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(val_fraction * num_samples)) if val_fraction > 0 else 0
    if n_val >= num_samples:
        raise ValueError(
            f"val_fraction={val_fraction} leaves no training sample out of {num_samples}; lower val_fraction"
        )
    val, train = perm[:n_val], perm[n_val:]
    if subset is not None:
        train = train[:subset]
    return train, val


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def build_loaders(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    batch_size: int = 128,
    val_fraction: float = 0.1,
    seed: int = 0,
    subset: int | None = None,
    num_workers: int = 0,
    distributed: bool | None = None,
    download: bool = False,
    pin_memory: bool = False,
    channels: int | None = None,
    **kw: Any,
) -> Loaders:
    """Train / val / test loaders of a registered dataset.

    Args:
        name: a registered dataset (``"fashion_mnist"``, ``"cifar10"``, ``"cifar100"``, ``"imagefolder"``,
            ``"synthetic"``, ``"cluttered_fashion_mnist"``).
        root: where to look for the files first (see each dataset).
        batch_size: samples per batch, for all three loaders.
        val_fraction: fraction of the training split set aside as validation (threshold calibration), in ``[0, 1)``;
            which samples depends on ``seed`` only.
        seed: fixes the validation split and the shuffling order of the training loader.
        subset: keep at most this many training samples (quick runs); deterministic given ``seed``. Validation and
            test are not reduced.
        num_workers: loader worker processes (0: load in the main process, usually best for the in-memory datasets).
        distributed: shard the training split over ranks with a ``DistributedSampler``; ``None``: when
            ``torch.distributed`` is initialised. The training loop must call :meth:`Loaders.set_epoch` every epoch.
            Validation and test are not sharded: every rank sees all of them.
        download: let torchvision download missing files (needs internet).
        pin_memory: pin batches in page-locked memory (faster host-to-GPU copies).
        channels: ``C`` of the batches; ``3`` repeats a grey dataset's images (Fashion-MNIST) for a network made
            for RGB images (torchvision's), and ``info`` says 3 channels (:func:`repeat_channels`). ``None``: the
            dataset's own.
        **kw: the dataset builder's options (e.g. ``augment=True``, ``canvas_size=96``, ``check_md5=False``).

    Returns:
        :class:`Loaders`.

    Raises:
        UnknownNameError: for an unregistered ``name``, listing the registered ones.
        ValueError: for a bad ``batch_size``, ``val_fraction``, ``subset``, ``num_workers`` or ``channels``, or
            ``distributed=True`` without an initialised process group.
    """
    builder = DATASETS.get(name)  # fail on the name before reading any file
    _check_positive_int("batch_size", batch_size)
    if subset is not None:
        _check_positive_int("subset", subset)
    if channels is not None:
        _check_positive_int("channels", channels)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = initialised
    elif distributed and not initialised:
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group (launch with torchrun and call "
            "torch.distributed.init_process_group first), or pass distributed=None"
        )

    splits = repeat_channels(builder(root=root, download=download, **kw), channels)
    train_index, val_index = split_indices(len(splits.train), val_fraction=val_fraction, seed=seed, subset=subset)
    train_set: Dataset = Subset(splits.train, train_index.tolist())
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": num_workers > 0,
    }
    if distributed:
        sampler = DistributedSampler(train_set, shuffle=True, seed=seed)
        train = DataLoader(train_set, sampler=sampler, **common)
    else:
        train = DataLoader(train_set, shuffle=True, generator=torch.Generator().manual_seed(seed), **common)
    val = DataLoader(Subset(splits.train_eval, val_index.tolist()), shuffle=False, **common) if len(val_index) else None
    test = DataLoader(splits.test, shuffle=False, **common)
    return Loaders(train=train, val=val, test=test, info=splits.info)
