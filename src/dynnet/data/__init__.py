"""Datasets and data loaders: one registry, one entry point.

>>> from dynnet.data import build_loaders
>>> loaders = build_loaders("synthetic", batch_size=64, subset=512)
>>> x, y = next(iter(loaders.train))  # Tensor[64, 3, 32, 32] float32 (normalised), Tensor[64] int64
>>> loaders.info.num_classes
10

Registered datasets (``DATASETS.names()``): ``cifar10``, ``cifar100``, ``cluttered_fashion_mnist``,
``fashion_mnist`` (the default of the project, read offline from the Debian package ``dataset-fashion-mnist``),
``imagefolder``, ``synthetic``. See ``docs/data.md``.
"""

from dynnet.data._base import (
    DATASETS,
    DatasetInfo,
    DatasetNotFoundError,
    DatasetSplits,
    InMemoryImageDataset,
    default_data_root,
    random_crop_flip,
)
from dynnet.data._idx import read_idx, write_idx
from dynnet.data.cifar import build_cifar, load_cifar
from dynnet.data.cluttered import ClutteredCanvasDataset, build_cluttered_fashion_mnist
from dynnet.data.fashion_mnist import build_fashion_mnist, find_fashion_mnist, load_fashion_mnist
from dynnet.data.folder import build_imagefolder, imagefolder_transforms
from dynnet.data.loaders import (
    Loaders,
    RepeatChannels,
    build_datasets,
    build_loaders,
    repeat_channels,
    split_indices,
)
from dynnet.data.synthetic import build_synthetic, make_synthetic

__all__ = [
    "DATASETS",
    "ClutteredCanvasDataset",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DatasetSplits",
    "InMemoryImageDataset",
    "Loaders",
    "RepeatChannels",
    "build_cifar",
    "build_cluttered_fashion_mnist",
    "build_datasets",
    "build_fashion_mnist",
    "build_imagefolder",
    "build_loaders",
    "build_synthetic",
    "default_data_root",
    "find_fashion_mnist",
    "imagefolder_transforms",
    "load_cifar",
    "load_fashion_mnist",
    "make_synthetic",
    "random_crop_flip",
    "read_idx",
    "repeat_channels",
    "split_indices",
    "write_idx",
]
