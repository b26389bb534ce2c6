"""What every dataset of :mod:`dynnet.data` shares: the registry, the info record, the error and the in-memory dataset.

The small datasets (Fashion-MNIST, CIFAR, synthetic, cluttered) keep their images as one ``uint8`` tensor and turn a
whole batch into normalised ``float32`` at once (``Dataset.__getitems__``, which :class:`~torch.utils.data.DataLoader`
calls with the batch's indices). No PIL image and no per-sample transform is made: on a 2-core CPU this is the
difference between a data loader that waits for the model and one the model waits for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dynnet.core.registry import Registry

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DatasetSplits",
    "InMemoryImageDataset",
    "default_data_root",
]

DATASETS: Registry[Callable[..., DatasetSplits]] = Registry("dataset")
"""Dataset builders: ``DATASETS.get(name)(*, root, download, **kw) -> DatasetSplits``."""

ENV_DATA_ROOT = "DYNNET_DATA"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where we looked; the message lists the paths searched and how to get the data."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a report need to know about a dataset.

    Attributes:
        name: the registry name (``"fashion_mnist"``, ...).
        num_classes: number of classes; targets are ``0 .. num_classes - 1``.
        in_channels: ``C`` of the ``Tensor[N, C, H, W]`` batches.
        image_size: ``(H, W)`` of the batches.
        mean: per-channel mean subtracted from ``[0, 1]`` pixels (length ``C``).
        std: per-channel std the pixels were divided by (length ``C``); ``x * std + mean`` undoes it for plots.
        classes: the class names, ``classes[target]``.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"mean and std need one value per channel ({self.in_channels}), got {len(self.mean)} and "
                f"{len(self.std)}"
            )
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{self.num_classes} classes but {len(self.classes)} class names")


@dataclass(frozen=True)
class DatasetSplits:
    """What a dataset builder returns.

    Attributes:
        train: the training split, with training-time augmentation if any.
        train_eval: the same samples in the same order as ``train`` without augmentation; the validation split is
            carved out of it, so that calibration sees evaluation-time inputs.
        test: the held-out split (the official test set, ImageNet's ``val/``).
        info: the dataset's :class:`DatasetInfo`.
    """

    train: Dataset
    train_eval: Dataset
    test: Dataset
    info: DatasetInfo


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/dynnet`` (``~/.cache/dynnet``): where downloads go when neither ``root`` nor env is set."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "dynnet"


def default_data_root() -> Path:
    """The folder downloads go to when no ``root`` is given: ``$DYNNET_DATA``, else :func:`cache_root`."""
    if os.environ.get(ENV_DATA_ROOT):
        return Path(os.environ[ENV_DATA_ROOT]).expanduser()
    return cache_root()


def candidate_roots(root: str | os.PathLike[str] | None) -> list[Path]:
    """The roots to search, in order: ``root``, ``$DYNNET_DATA``, :func:`cache_root` (without duplicates)."""
    found: list[Path] = []
    for candidate in (root, os.environ.get(ENV_DATA_ROOT) or None, cache_root()):
        if candidate is None:
            continue
        path = Path(candidate).expanduser()
        if path not in found:
            found.append(path)
    return found


def _as_index(indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(indices, dtype=torch.long).reshape(-1)


class InMemoryImageDataset(Dataset):
    """Images held as one ``uint8`` tensor, served normalised, a whole batch at a time.

    Args:
        images: ``Tensor[N, C, H, W]`` of ``uint8`` pixels.
        targets: ``Tensor[N]`` class indices.
        mean: per-channel mean of the ``[0, 1]`` pixels (length ``C``).
        std: per-channel std of the ``[0, 1]`` pixels (length ``C``).
        augment: random crop (zero padding of ``pad`` pixels) and horizontal flip, done on the batch tensor. The
            randomness comes from torch's global generator, which :class:`~torch.utils.data.DataLoader` seeds
            differently in each worker; seed it (``torch.manual_seed``) for repeatable runs.
        pad: the padding of the random crop.

    Items are ``(Tensor[C, H, W] float32, int)``; ``__getitems__`` returns a list of them for one batch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        pad: int = 4,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 Tensor[N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self._init_common(targets, channels=images.shape[1], mean=mean, std=std, augment=augment, pad=pad)

    def _init_common(
        self,
        targets: torch.Tensor,
        *,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool,
        pad: int,
    ) -> None:
        targets = torch.as_tensor(targets, dtype=torch.long)
        if targets.dim() != 1:
            raise ValueError(f"targets must be Tensor[N], got shape {tuple(targets.shape)}")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values (one per channel), got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.targets = targets
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        self.pad = pad
        # x_norm = (u8 / 255 - mean) / std = u8 * scale + shift: one fused multiply-add per pixel.
        std_t = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1) / std_t

    def __len__(self) -> int:
        return len(self.targets)

    def with_augment(self, augment: bool) -> InMemoryImageDataset:
        """A shallow copy sharing the same tensors, with augmentation switched on or off."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.augment = augment
        return clone

    def uint8_batch(self, index: torch.Tensor) -> torch.Tensor:
        """Raw pixels of the samples ``index``, ``Tensor[B, C, H, W]`` ``uint8``, before augmentation."""
        return self.images[index]

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fetch samples as a batch.

        Args:
            indices: ``B`` sample indices.

        Returns:
            ``(Tensor[B, C, H, W] float32, Tensor[B] int64)``: normalised (and augmented) images and targets.
        """
        index = _as_index(indices)
        if len(index) and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise IndexError(f"index out of range for a dataset of {len(self)} samples")
        x = self.uint8_batch(index)
        if self.augment:
            x = random_crop_flip(x, pad=self.pad)
        return x.to(torch.float32).mul_(self._scale).add_(self._shift), self.targets[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch([index])
        return x[0], int(y[0])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        x, y = self.batch(indices)
        return list(zip(x.unbind(0), y.tolist(), strict=True))


def random_crop_flip(x: torch.Tensor, *, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, per sample, on a whole batch.

    The tensor version of ``RandomCrop(H, padding=pad)`` + ``RandomHorizontalFlip()``.

    Args:
        x: ``Tensor[B, C, H, W]`` (any dtype).
        pad: zero padding on each side before cropping back to ``H × W``.
        generator: source of randomness; torch's global generator if ``None``.

    Returns:
        ``Tensor[B, C, H, W]`` of ``x``'s dtype.
    """
    B, _, H, W = x.shape
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (2, B), generator=generator)
        rows = (offsets[0, :, None] + torch.arange(H))[:, :, None]  # [B, H, 1]
        cols = (offsets[1, :, None] + torch.arange(W))[:, None, :]  # [B, 1, W]
        # Advanced indices split by the channel slice move to the front: the result is [B, H, W, C].
        x = padded[torch.arange(B)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(B, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x).contiguous()
