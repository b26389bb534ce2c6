"""Fashion-MNIST, the default dataset of dynnet, read from its IDX files without a network.

Han Xiao, Kashif Rasul, Roland Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
Algorithms", arXiv 2017, https://arxiv.org/abs/1708.07747.

Where the files are looked for, in order (the first folder holding the split's two files wins):

1. the ``root`` argument, then ``root/FashionMNIST/raw`` (torchvision's layout);
2. ``$DYNNET_DATA``, then ``$DYNNET_DATA/FashionMNIST/raw``;
3. ``/usr/share/datasets/fashion-mnist``, where the Debian package ``dataset-fashion-mnist`` installs them;
4. ``<cache>/FashionMNIST/raw`` with ``<cache>`` = ``$XDG_CACHE_HOME/dynnet`` (``~/.cache/dynnet``), where
   ``download=True`` puts them when no ``root`` is given.

Each file may be gzip-compressed (``.gz``, as shipped) or not (as torchvision extracts them).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dynnet.data._base import (
    DATASETS,
    ENV_DATA_ROOT,
    DatasetInfo,
    DatasetNotFoundError,
    DatasetSplits,
    InMemoryImageDataset,
    cache_root,
    default_data_root,
)
from dynnet.data._idx import read_idx

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "build_fashion_mnist",
    "find_fashion_mnist",
    "load_fashion_mnist",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Statistics of the 60,000 training images in [0, 1].
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
_TORCHVISION_SUBDIR = Path("FashionMNIST") / "raw"
_INSTALL_HINT = (
    "Install the Debian package (apt-get update && apt-get install -y dataset-fashion-mnist), "
    "pass download=True (needs internet; torchvision fetches it), "
    "or point root= / $DYNNET_DATA at a folder holding the IDX files."
)


def _split_stems(train: bool) -> tuple[str, str]:
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _search_dirs(root: str | os.PathLike[str] | None) -> list[Path]:
    given = [Path(r).expanduser() for r in (root, os.environ.get(ENV_DATA_ROOT)) if r]
    dirs: list[Path] = []
    for base in given:
        dirs += [base, base / _TORCHVISION_SUBDIR]
    dirs += [DEBIAN_FASHION_MNIST, cache_root() / _TORCHVISION_SUBDIR]
    return list(dict.fromkeys(dirs))  # ordered, without duplicates


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(root: str | os.PathLike[str] | None = None, *, train: bool = True) -> tuple[Path, Path]:
    """Find the IDX files of one split (see the module docstring for the search order).

    Args:
        root: a folder to search first.
        train: the 60,000-image training split, else the 10,000-image test split.

    Returns:
        ``(images_file, labels_file)``.

    Raises:
        DatasetNotFoundError: listing every folder searched and how to install the data.
    """
    stems = _split_stems(train)
    dirs = _search_dirs(root)
    for folder in dirs:
        files = [_find_file(folder, stem) for stem in stems]
        if files[0] is not None and files[1] is not None:
            return files[0], files[1]
    searched = "\n  ".join(str(d) for d in dirs)
    raise DatasetNotFoundError(
        f"Fashion-MNIST {'train' if train else 'test'} files ({stems[0]}[.gz], {stems[1]}[.gz]) not found; "
        f"searched:\n  {searched}\n{_INSTALL_HINT}"
    )


def _download(root: str | os.PathLike[str] | None) -> None:
    target = Path(root).expanduser() if root is not None else default_data_root()
    import torchvision.datasets  # deferred: importing torchvision costs about a second

    # torchvision verifies the md5 of what it fetches and extracts it into target/FashionMNIST/raw.
    torchvision.datasets.FashionMNIST(str(target), train=True, download=True)


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, *, train: bool = True, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of Fashion-MNIST as tensors.

    Args:
        root: a folder to search first (and to download into).
        train: the training split (60,000 images), else the test split (10,000).
        download: when the files are found nowhere, fetch them with ``torchvision.datasets.FashionMNIST`` into
            ``root`` (or the cache folder) first.

    Returns:
        ``(images, targets)``: ``Tensor[N, 28, 28]`` ``uint8`` and ``Tensor[N]`` ``int64`` in ``0 .. 9``.

    Raises:
        DatasetNotFoundError: if the files are found nowhere and ``download`` is false.
        ValueError: naming the file, if a file is corrupt or the two files disagree.
    """
    try:
        images_file, labels_file = find_fashion_mnist(root, train=train)
    except DatasetNotFoundError:
        if not download:
            raise
        _download(root)
        images_file, labels_file = find_fashion_mnist(root, train=train)
    images = read_idx(images_file, expected_ndim=3)
    labels = read_idx(labels_file, expected_ndim=1)
    if images.dtype != torch.uint8 or labels.dtype != torch.uint8:
        raise ValueError(f"Fashion-MNIST files must hold uint8, got {images.dtype} ({images_file}), {labels.dtype}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_file} holds {images.shape[0]} images but {labels_file} holds {labels.shape[0]} labels"
        )
    if labels.numel() and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_file} holds label {int(labels.max())}, expected 0 .. 9")
    return images, labels.long()


def fashion_mnist_info(name: str = "fashion_mnist", image_size: tuple[int, int] = (28, 28)) -> DatasetInfo:
    """The :class:`DatasetInfo` of Fashion-MNIST (and of datasets made from it)."""
    return DatasetInfo(
        name=name,
        num_classes=10,
        in_channels=1,
        image_size=image_size,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        classes=FASHION_MNIST_CLASSES,
    )


@DATASETS.register("fashion_mnist")
def build_fashion_mnist(
    *, root: str | os.PathLike[str] | None = None, download: bool = False, augment: bool = False, pad: int = 2
) -> DatasetSplits:
    """Fashion-MNIST as in-memory datasets of ``(Tensor[1, 28, 28] float32, int)``, normalised.

    Args:
        root: a folder to search first (see the module docstring); ``None`` searches the usual places.
        download: fetch the files with torchvision when found nowhere (needs internet).
        augment: random crop (zero padding of ``pad`` pixels) and horizontal flip of the training split (the
            pretraining schedule of ``dynnet pretrain``); the evaluation splits are never augmented.
        pad: the padding of the random crop.

    Returns:
        :class:`DatasetSplits` with 60,000 training and 10,000 test images.
    """
    info = fashion_mnist_info()
    splits = []
    for train in (True, False):
        images, targets = load_fashion_mnist(root, train=train, download=download)
        splits.append(InMemoryImageDataset(images[:, None], targets, mean=info.mean, std=info.std, pad=pad))
    train = splits[0].with_augment(augment) if augment else splits[0]
    return DatasetSplits(train=train, train_eval=splits[0], test=splits[1], info=info)
