"""CIFAR-10 and CIFAR-100 in torchvision's on-disk format, served from memory.

Alex Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", tech. report, 2009,
https://www.cs.toronto.edu/~kriz/cifar.html.

The files are read by ``torchvision.datasets.CIFAR10`` / ``CIFAR100`` (folders ``cifar-10-batches-py/`` and
``cifar-100-python/`` under a root), which also downloads them when ``download=True``. We then keep the pixels as one
``uint8`` tensor and normalise (and optionally augment) whole batches, never making a PIL image.

Integrity: torchvision compares every file's md5 with the published one, and so do we by default. Files made by hand
in the same format (small test fixtures, a re-packed subset) cannot pass that check: ``check_md5=False`` reads them
through a subclass whose file lists carry no md5, so that only the files' presence is checked. The default stays the
full check, and a download is always verified.

Roots searched, in order: ``root``, ``$DYNNET_DATA``, ``$XDG_CACHE_HOME/dynnet`` (``~/.cache/dynnet``).
"""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dynnet.data._base import (
    DATASETS,
    DatasetInfo,
    DatasetNotFoundError,
    DatasetSplits,
    InMemoryImageDataset,
    candidate_roots,
    default_data_root,
)

if TYPE_CHECKING:
    from torchvision.datasets import CIFAR10

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "build_cifar", "load_cifar"]

# Statistics of the training images in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _without_md5(cls: type[CIFAR10]) -> type[CIFAR10]:
    # torchvision's check_integrity(path, md5=None) checks that the file exists and nothing more.
    return type(
        f"{cls.__name__}WithoutMD5",
        (cls,),
        {
            "__doc__": f"{cls.__name__} checking only that its files exist (``check_md5=False``).",
            "train_list": [[name, None] for name, _ in cls.train_list],
            "test_list": [[name, None] for name, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
        },
    )


@functools.cache
def _torchvision_class(num_classes: int, check_md5: bool = True) -> type[CIFAR10]:
    import torchvision.datasets  # deferred: importing torchvision costs about a second

    cls = {10: torchvision.datasets.CIFAR10, 100: torchvision.datasets.CIFAR100}[num_classes]
    return cls if check_md5 else _without_md5(cls)


def _expected_files(cls: type[CIFAR10]) -> list[str]:
    return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _find_root(root: str | os.PathLike[str] | None, cls: type[CIFAR10]) -> Path | None:
    for candidate in candidate_roots(root):
        folder = candidate / cls.base_folder
        if all((folder / name).is_file() for name in _expected_files(cls)):
            return candidate
    return None


def load_cifar(
    root: str | os.PathLike[str] | None = None,
    *,
    num_classes: int = 10,
    train: bool = True,
    download: bool = False,
    check_md5: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Load one split of CIFAR-10 or CIFAR-100.

    Args:
        root: the folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/`` (searched first).
        num_classes: 10 or 100.
        train: the 50,000-image training split, else the 10,000-image test split.
        download: when found nowhere, let torchvision download (and verify) it into ``root`` or the default root.
        check_md5: compare the files with their published md5 (turn off only for hand-made files).

    Returns:
        ``(images, targets, classes)``: ``Tensor[N, 3, 32, 32]`` ``uint8``, ``Tensor[N]`` ``int64`` and the class
        names (CIFAR-100: the 100 fine labels).

    Raises:
        DatasetNotFoundError: naming the folders searched and the files expected.
        ValueError: if the files are there but corrupt (md5 mismatch or unreadable).
    """
    if num_classes not in (10, 100):
        raise ValueError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes}")
    cls = _torchvision_class(num_classes)
    found = _find_root(root, cls)
    if found is None and download:
        found = Path(root).expanduser() if root is not None else default_data_root()
        cls(str(found), train=train, download=True)  # fetches and verifies the archive, extracts it
    if found is None:
        searched = "\n  ".join(str(r / cls.base_folder) for r in candidate_roots(root))
        raise DatasetNotFoundError(
            f"CIFAR-{num_classes} not found: no folder holds all of {', '.join(_expected_files(cls))}; searched:\n"
            f"  {searched}\nPass download=True (needs internet), or put torchvision's extracted "
            f"'{cls.base_folder}' folder under root= or $DYNNET_DATA."
        )
    reader = _torchvision_class(num_classes, check_md5)
    folder = found / cls.base_folder
    try:
        dataset = reader(str(found), train=train, download=False)
    except RuntimeError as err:  # torchvision's "not found or corrupted": the files exist, so their md5 is wrong
        raise ValueError(
            f"CIFAR-{num_classes} files in {folder} do not match their published md5 ({err}). Re-download them, or "
            "pass check_md5=False for files you made yourself in the same format."
        ) from err
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        raise ValueError(f"CIFAR-{num_classes} files in {folder} are unreadable: {err!r}") from err
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
    targets = torch.as_tensor(dataset.targets, dtype=torch.long)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(f"CIFAR-{num_classes} files in {folder} hold labels outside 0 .. {num_classes - 1}")
    return images, targets, tuple(dataset.classes)


def build_cifar(
    *,
    num_classes: int = 10,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    augment: bool = False,
    check_md5: bool = True,
) -> DatasetSplits:
    """CIFAR-10/100 as in-memory datasets of ``(Tensor[3, 32, 32] float32, int)``, normalised.

    Args:
        num_classes: 10 or 100.
        root: the folder holding torchvision's CIFAR folder (searched first).
        download: let torchvision download it when found nowhere (needs internet).
        augment: random crop (4-pixel zero padding) and horizontal flip on the training split, done on tensors.
        check_md5: compare the files with their published md5 (turn off only for hand-made files).

    Returns:
        :class:`DatasetSplits`; ``train_eval`` is ``train`` without augmentation.
    """
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
    kw = {"num_classes": num_classes, "download": download, "check_md5": check_md5}
    train_images, train_targets, classes = load_cifar(root, train=True, **kw)
    test_images, test_targets, _ = load_cifar(root, train=False, **kw)
    info = DatasetInfo(
        name=f"cifar{num_classes}",
        num_classes=num_classes,
        in_channels=3,
        image_size=(32, 32),
        mean=mean,
        std=std,
        classes=classes,
    )
    train_eval = InMemoryImageDataset(train_images, train_targets, mean=mean, std=std)
    test = InMemoryImageDataset(test_images, test_targets, mean=mean, std=std)
    return DatasetSplits(train=train_eval.with_augment(augment), train_eval=train_eval, test=test, info=info)


@DATASETS.register("cifar10")
def build_cifar10(
    *, root: str | os.PathLike[str] | None = None, download: bool = False, augment: bool = False, check_md5: bool = True
) -> DatasetSplits:
    """CIFAR-10: 50,000 training and 10,000 test images of 10 classes; see :func:`build_cifar`."""
    return build_cifar(num_classes=10, root=root, download=download, augment=augment, check_md5=check_md5)


@DATASETS.register("cifar100")
def build_cifar100(
    *, root: str | os.PathLike[str] | None = None, download: bool = False, augment: bool = False, check_md5: bool = True
) -> DatasetSplits:
    """CIFAR-100 (fine labels): 50,000 training and 10,000 test images of 100 classes; see :func:`build_cifar`."""
    return build_cifar(num_classes=100, root=root, download=download, augment=augment, check_md5=check_md5)
