"""A synthetic, learnable image dataset for tests and quick runs: no files, any shape, deterministic from a seed.

Each class has a smooth random pattern (random values on a coarse grid, bilinearly upsampled to ``H × W``). A sample
is its class's pattern under a random contrast, plus Gaussian noise, stored as ``uint8``. A small network separates
the classes within an epoch or two at the default noise, so a training pipeline can be checked end to end in
seconds; raise ``noise`` to make it harder.
"""

from __future__ import annotations

import os

import torch

from dynnet.data._base import DATASETS, DatasetInfo, DatasetSplits, InMemoryImageDataset

__all__ = ["build_synthetic", "make_synthetic"]


def make_synthetic(
    num_samples: int,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int | tuple[int, int] = 32,
    noise: float = 0.15,
    seed: int = 0,
    split: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` synthetic images.

    Args:
        num_samples: ``N``.
        num_classes: number of classes (and of patterns); targets are balanced (``N // num_classes`` each, the rest
            spread over the first classes) and shuffled.
        in_channels: ``C``.
        image_size: ``H`` (square) or ``(H, W)``.
        noise: std of the Gaussian noise, in units of the ``[0, 1]`` pixel range.
        seed: fixes the class patterns and, with ``split``, the samples.
        split: which draw of samples (0 train, 1 test, ...): the patterns are shared, the samples differ.

    Returns:
        ``(images, targets)``: ``Tensor[N, C, H, W]`` ``uint8`` and ``Tensor[N]`` ``int64``.
    """
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    if num_samples < 0 or num_classes < 1 or in_channels < 1 or H < 1 or W < 1:
        raise ValueError(
            f"need num_samples >= 0 and positive num_classes, in_channels, image_size; got {num_samples}, "
            f"{num_classes}, {in_channels}, {(H, W)}"
        )
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    patterns_gen = torch.Generator().manual_seed(seed)
    grid = (max(2, H // 4), max(2, W // 4))
    coarse = torch.rand(num_classes, in_channels, *grid, generator=patterns_gen)
    patterns = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    # Sample draws get their own stream so that changing N or the split never changes the patterns.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (split + 1))
    targets = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=gen)]
    contrast = 0.6 + 0.4 * torch.rand(num_samples, 1, 1, 1, generator=gen)
    x = 0.5 + (patterns[targets] - 0.5) * contrast + noise * torch.randn(num_samples, in_channels, H, W, generator=gen)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, targets


@DATASETS.register("synthetic")
def build_synthetic(
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    num_train: int = 1024,
    num_test: int = 256,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int | tuple[int, int] = 32,
    noise: float = 0.15,
    data_seed: int = 0,
) -> DatasetSplits:
    """Synthetic class-conditional patterns as in-memory datasets of ``(Tensor[C, H, W] float32, int)``.

    Args:
        root: ignored (nothing is read); accepted so that every dataset builder takes the same arguments.
        download: ignored, as ``root``.
        num_train: training samples.
        num_test: test samples.
        num_classes: number of classes.
        in_channels: ``C``.
        image_size: ``H`` (square) or ``(H, W)``.
        noise: Gaussian noise std in ``[0, 1]`` pixel units.
        data_seed: fixes the patterns and the samples (independent of the split seed of ``build_loaders``).

    Returns:
        :class:`DatasetSplits`; mean and std are measured on the training images.
    """
    del root, download
    kw = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        "noise": noise,
        "seed": data_seed,
    }
    train_images, train_targets = make_synthetic(num_train, split=0, **kw)
    test_images, test_targets = make_synthetic(num_test, split=1, **kw)
    pixels = train_images.to(torch.float32).div_(255).transpose(0, 1).reshape(in_channels, -1)
    mean = tuple(pixels.mean(1).tolist()) if num_train else (0.5,) * in_channels
    std = tuple(pixels.std(1).clamp_min(1e-3).tolist()) if num_train > 1 else (0.25,) * in_channels
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    info = DatasetInfo(
        name="synthetic",
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=(H, W),
        mean=mean,
        std=std,
        classes=tuple(f"class_{i}" for i in range(num_classes)),
    )
    train = InMemoryImageDataset(train_images, train_targets, mean=mean, std=std)
    test = InMemoryImageDataset(test_images, test_targets, mean=mean, std=std)
    return DatasetSplits(train=train, train_eval=train, test=test, info=info)
