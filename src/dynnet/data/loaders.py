"""One entry point from a dataset name to train / val / test data loaders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from dynnet.data._base import DATASETS, DatasetInfo, DatasetSplits

__all__ = ["Loaders", "build_datasets", "build_loaders", "split_indices"]


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


def build_datasets(
    name: str, *, root: str | os.PathLike[str] | None = None, download: bool = False, **kw: Any
) -> DatasetSplits:
    """Build the datasets registered as ``name`` in :data:`DATASETS`.

    Args:
        name: a registered name (``DATASETS.names()``).
        root: where to look for the files first.
        download: let torchvision download missing files (needs internet).
        **kw: the builder's own options (e.g. ``augment=True`` for CIFAR, ``canvas_size=96``).

    Returns:
        :class:`DatasetSplits`.

    Raises:
        UnknownNameError: listing the registered names.
    """
    return DATASETS.get(name)(root=root, download=download, **kw)


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
        **kw: the dataset builder's options (e.g. ``augment=True``, ``canvas_size=96``, ``check_md5=False``).

    Returns:
        :class:`Loaders`.

    Raises:
        UnknownNameError: for an unregistered ``name``, listing the registered ones.
        ValueError: for a bad ``batch_size``, ``val_fraction``, ``subset`` or ``num_workers``, or ``distributed=True``
            without an initialised process group.
    """
    builder = DATASETS.get(name)  # fail on the name before reading any file
    _check_positive_int("batch_size", batch_size)
    if subset is not None:
        _check_positive_int("subset", subset)
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

    splits = builder(root=root, download=download, **kw)
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
