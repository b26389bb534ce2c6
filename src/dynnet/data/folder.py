"""Image folders in the ImageNet layout, read by ``torchvision.datasets.ImageFolder``.

Layout: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (any extension PIL reads). ``val/`` is the
held-out test split (as ImageNet's validation set is used in papers); the validation split of
:func:`~dynnet.data.build_loaders` is carved out of ``train/``.

Unlike the small datasets, images are decoded and transformed per sample (their sizes differ), with the usual
ImageNet recipe: ``RandomResizedCrop`` + horizontal flip for training, ``Resize`` + ``CenterCrop`` for evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dynnet.data._base import DATASETS, DatasetInfo, DatasetNotFoundError, DatasetSplits

if TYPE_CHECKING:
    from torchvision.transforms import v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_imagefolder", "imagefolder_transforms"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagefolder_transforms(
    *,
    image_size: int = 224,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: bool = True,
) -> tuple[v2.Transform, v2.Transform]:
    """The training and evaluation transforms, PIL image → ``Tensor[3, image_size, image_size]`` float32, normalised.

    Args:
        image_size: side of the square crop the network sees.
        resize_size: side of the shorter edge before the evaluation centre crop; default ``image_size / 0.875``
            (256 for 224, the standard ratio).
        mean: per-channel mean of ``[0, 1]`` pixels.
        std: per-channel std of ``[0, 1]`` pixels.
        augment: random resized crop and flip for training; if false, training uses the evaluation transform.

    Returns:
        ``(train_transform, eval_transform)``.
    """
    from torchvision.transforms import v2  # deferred: importing torchvision costs about a second

    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    resize = resize_size if resize_size is not None else round(image_size / 0.875)
    if resize < image_size:
        raise ValueError(f"resize_size ({resize}) must be >= image_size ({image_size})")
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    evaluation = v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *tail])
    if not augment:
        return evaluation, evaluation
    train = v2.Compose(
        [v2.ToImage(), v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *tail]
    )
    return train, evaluation


@DATASETS.register("imagefolder")
def build_imagefolder(
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int = 224,
    resize_size: int | None = None,
    train_dir: str = "train",
    test_dir: str = "val",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: bool = True,
) -> DatasetSplits:
    """An ImageNet-layout folder as datasets of ``(Tensor[3, image_size, image_size] float32, int)``.

    Args:
        root: the folder holding ``train_dir`` and ``test_dir`` (required).
        download: must be false: there is nothing to download an arbitrary folder from.
        image_size: side of the square crop.
        resize_size: shorter edge before the evaluation centre crop (default ``image_size / 0.875``).
        train_dir: sub-folder of the training split.
        test_dir: sub-folder of the held-out split.
        mean: per-channel mean (ImageNet's by default).
        std: per-channel std (ImageNet's by default).
        augment: random resized crop + flip for training.

    Returns:
        :class:`DatasetSplits`; ``train`` and ``train_eval`` list the same files with different transforms.

    Raises:
        ValueError: if ``root`` is missing, ``download`` is true, or the two splits have different classes.
        DatasetNotFoundError: if a split folder does not exist or holds no image.
    """
    if root is None:
        raise ValueError("the imagefolder dataset needs root= (a folder with train/<class>/ and val/<class>/)")
    if download:
        raise ValueError("the imagefolder dataset cannot be downloaded; pass download=False and an existing root")
    from torchvision.datasets import ImageFolder  # deferred: importing torchvision costs about a second

    root = Path(root).expanduser()
    train_tf, eval_tf = imagefolder_transforms(
        image_size=image_size, resize_size=resize_size, mean=mean, std=std, augment=augment
    )
    split_dirs = {"train": root / train_dir, "test": root / test_dir}
    for split, folder in split_dirs.items():
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"imagefolder {split} split not found: {folder} is not a folder. Expected the ImageNet layout "
                f"{root}/{train_dir}/<class>/*.jpg and {root}/{test_dir}/<class>/*.jpg"
            )
    try:
        train = ImageFolder(str(split_dirs["train"]), transform=train_tf)
        test = ImageFolder(str(split_dirs["test"]), transform=eval_tf)
    except FileNotFoundError as err:  # torchvision: a folder without class sub-folders or without images
        raise DatasetNotFoundError(f"imagefolder under {root}: {err}") from err
    if train.classes != test.classes:
        raise ValueError(
            f"{split_dirs['train']} and {split_dirs['test']} must hold the same class folders; got "
            f"{train.classes} and {test.classes}"
        )
    # A second index of the same files (sorted the same way), so that validation samples see the eval transform.
    train_eval = ImageFolder(str(split_dirs["train"]), transform=eval_tf)
    info = DatasetInfo(
        name="imagefolder",
        num_classes=len(train.classes),
        in_channels=3,
        image_size=(image_size, image_size),
        mean=tuple(mean),
        std=tuple(std),
        classes=tuple(train.classes),
    )
    return DatasetSplits(train=train, train_eval=train_eval, test=test, info=info)
