"""Cluttered Fashion-MNIST: an item at a random place on a larger canvas, among clutter, so that most pixels are
background and spatial / glimpse methods have real sparsity to exploit.

The construction of "Cluttered Translated MNIST" in Volodymyr Mnih, Nicolas Heess, Alex Graves, Koray Kavukcuoglu,
"Recurrent Models of Visual Attention", NeurIPS 2014, https://arxiv.org/abs/1406.6247 (Sec. 4.1), applied to
Fashion-MNIST. Departures from the paper:

- Fashion-MNIST items instead of digits; canvases of 64×64 by default (the paper: 60×60 with 4 clutter pieces and
  100×100 with 8); ``num_clutter=None`` takes 4 below 80 pixels and 8 from 80 up (so 96×96 gets 8).
- Clutter pieces and the item are merged with a pixel-wise maximum (no piece erases another).
- Clutter is cut from other items of the *same split*, so test canvases hold no training pixels.

Rendering is lazy and batched: at construction one generator (seeded by ``seed`` and ``split``) draws every sample's
placement and clutter (a few integers per sample); a batch is then composed with ``num_clutter + 1`` vectorised
scatters. Sample ``i`` is therefore the same image whatever the batch, order, subset or number of workers, and no
``N × S × S`` tensor is ever held (60,000 canvases of 96×96 would be 553 MB).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from dynnet.data._base import DATASETS, DatasetInfo, DatasetSplits, InMemoryImageDataset
from dynnet.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

__all__ = ["ClutteredCanvasDataset", "build_cluttered_fashion_mnist", "default_num_clutter"]


def default_num_clutter(canvas_size: int) -> int:
    """Clutter pieces for a canvas side: 4 below 80 pixels, 8 from 80 up (the paper's 60×60 and 100×100 settings)."""
    return 4 if canvas_size < 80 else 8


class ClutteredCanvasDataset(InMemoryImageDataset):
    """Items pasted at random positions on a black canvas with random fragments of other items.

    Args:
        images: ``Tensor[N, h, w]`` or ``Tensor[N, 1, h, w]`` ``uint8`` items (Fashion-MNIST: ``h = w = 28``).
        targets: ``Tensor[N]`` class of each item.
        canvas_size: side ``S`` of the square canvas (``S >= h, w``).
        num_clutter: fragments per canvas; ``None``: :func:`default_num_clutter`.
        clutter_size: side of the square fragments (``<= h, w``).
        seed: fixes every placement and fragment.
        split: a second seed component, so that train (0) and test (1) canvases differ for the same ``seed``.
        mean: normalisation mean; ``None``: measured on the first (up to) 1,024 canvases.
        std: normalisation std; ``None``: measured like ``mean``.

    Attributes:
        positions: ``Tensor[N, 2]`` top-left ``(y, x)`` of each item's ``h × w`` patch on the canvas.
        boxes: ``Tensor[N, 4]`` tight box of each item's non-zero pixels on the canvas, ``(x0, y0, x1, y1)`` in pixels
            with exclusive ends (torchvision's ``xyxy``); the whole patch for a blank item.

    Items are ``(Tensor[1, S, S] float32, int)``, normalised.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        *,
        canvas_size: int = 64,
        num_clutter: int | None = None,
        clutter_size: int = 8,
        seed: int = 0,
        split: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if images.dim() == 4 and images.shape[1] == 1:
            images = images[:, 0]
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise ValueError(f"images must be uint8 Tensor[N, h, w], got {images.dtype} {tuple(images.shape)}")
        N, h, w = images.shape
        num_clutter = default_num_clutter(canvas_size) if num_clutter is None else num_clutter
        if canvas_size < max(h, w):
            raise ValueError(f"canvas_size ({canvas_size}) must be >= the item size {(h, w)}")
        if num_clutter < 0:
            raise ValueError(f"num_clutter must be >= 0, got {num_clutter}")
        if not 0 < clutter_size <= min(h, w, canvas_size):
            raise ValueError(f"clutter_size must be in 1 .. {min(h, w)} (the item size), got {clutter_size}")
        if num_clutter and N < 2:
            raise ValueError("clutter is cut from other items: need at least 2 items when num_clutter > 0")
        self.sources = images
        self.canvas_size = canvas_size
        self.num_clutter = num_clutter
        self.clutter_size = clutter_size
        self.seed = seed
        self.split = split

        gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (split + 1))
        S, c, k = canvas_size, clutter_size, num_clutter
        self.positions = torch.stack(
            [torch.randint(0, S - h + 1, (N,), generator=gen), torch.randint(0, S - w + 1, (N,), generator=gen)], 1
        )
        # Another item than the sample's own: draw from N - 1 and skip over the sample's index.
        other = torch.randint(0, max(N - 1, 1), (N, k), generator=gen)
        self._clutter_source = other + (other >= torch.arange(N)[:, None]).long()
        self._clutter_crop = torch.stack(
            [torch.randint(0, h - c + 1, (N, k), generator=gen), torch.randint(0, w - c + 1, (N, k), generator=gen)],
            -1,
        )  # [N, k, 2] top-left (y, x) of the fragment inside its source item
        self._clutter_place = torch.randint(0, S - c + 1, (N, k, 2), generator=gen)  # [N, k, 2] on the canvas
        self.boxes = self._tight_boxes()

        if mean is None or std is None:
            sample = self.uint8_batch(torch.arange(min(N, 1024))).to(torch.float32).div_(255)
            mean = (float(sample.mean()),) if mean is None else mean
            std = (max(float(sample.std()), 1e-3),) if std is None else std
        self._init_common(targets, channels=1, mean=mean, std=std, augment=False, pad=0)
        if len(self.targets) != N:
            raise ValueError(f"{N} images but {len(self.targets)} targets")

    def _tight_boxes(self) -> torch.Tensor:
        _, h, w = self.sources.shape
        on = self.sources > 0
        rows, cols = on.any(2), on.any(1)  # [N, h], [N, w]
        blank = ~rows.any(1)
        r0 = rows.to(torch.uint8).argmax(1)
        r1 = h - rows.flip(1).to(torch.uint8).argmax(1)
        c0 = cols.to(torch.uint8).argmax(1)
        c1 = w - cols.flip(1).to(torch.uint8).argmax(1)
        r0, c0 = r0.masked_fill(blank, 0), c0.masked_fill(blank, 0)
        r1, c1 = r1.masked_fill(blank, h), c1.masked_fill(blank, w)
        y, x = self.positions[:, 0], self.positions[:, 1]
        return torch.stack([x + c0, y + r0, x + c1, y + r1], 1)

    def box(self, index: int) -> torch.Tensor:
        """``Tensor[4]``: the tight ``(x0, y0, x1, y1)`` box of sample ``index``'s item (see ``boxes``)."""
        return self.boxes[index]

    def uint8_batch(self, index: torch.Tensor) -> torch.Tensor:
        """Compose the canvases of samples ``index``: ``Tensor[B, 1, S, S]`` ``uint8``."""
        B = len(index)
        S, c = self.canvas_size, self.clutter_size
        _, h, w = self.sources.shape
        canvas = torch.zeros(B, S, S, dtype=torch.uint8)
        batch = torch.arange(B)[:, None, None]
        span_c = torch.arange(c)

        def paste(patch: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int]) -> None:
            rows = (top[:, None] + torch.arange(size[0]))[:, :, None]
            cols = (left[:, None] + torch.arange(size[1]))[:, None, :]
            canvas[batch, rows, cols] = torch.maximum(canvas[batch, rows, cols], patch)

        for j in range(self.num_clutter):
            source = self._clutter_source[index, j]
            crop = self._clutter_crop[index, j]
            fragment = self.sources[
                source[:, None, None], (crop[:, 0, None] + span_c)[:, :, None], (crop[:, 1, None] + span_c)[:, None, :]
            ]  # [B, c, c]
            place = self._clutter_place[index, j]
            paste(fragment, place[:, 0], place[:, 1], (c, c))
        position = self.positions[index]
        paste(self.sources[index], position[:, 0], position[:, 1], (h, w))
        return canvas[:, None]

    def with_augment(self, augment: bool) -> ClutteredCanvasDataset:
        """Augmentation would move items away from ``boxes``: only ``augment=False`` is accepted."""
        if augment:
            raise ValueError("ClutteredCanvasDataset does not augment: random placement already is its augmentation")
        return self


@DATASETS.register("cluttered_fashion_mnist")
def build_cluttered_fashion_mnist(
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    canvas_size: int = 64,
    num_clutter: int | None = None,
    clutter_size: int = 8,
    data_seed: int = 0,
) -> DatasetSplits:
    """Cluttered Fashion-MNIST as datasets of ``(Tensor[1, S, S] float32, int)``, normalised, rendered per batch.

    Args:
        root: where to look for Fashion-MNIST first (see :mod:`dynnet.data.fashion_mnist`).
        download: fetch Fashion-MNIST with torchvision when found nowhere (needs internet).
        canvas_size: side ``S`` of the canvas (64 by default; 96 for the larger setting).
        num_clutter: fragments per canvas; ``None``: 4 below 80 pixels, 8 from 80 up.
        clutter_size: side of the square fragments.
        data_seed: fixes every placement and fragment (independent of the split seed of ``build_loaders``).

    Returns:
        :class:`DatasetSplits` (60,000 / 10,000 canvases); the test split is normalised with the training statistics.
    """
    kw = {"canvas_size": canvas_size, "num_clutter": num_clutter, "clutter_size": clutter_size, "seed": data_seed}
    images, targets = load_fashion_mnist(root, train=True, download=download)
    train = ClutteredCanvasDataset(images, targets, split=0, **kw)
    images, targets = load_fashion_mnist(root, train=False, download=download)
    test = ClutteredCanvasDataset(images, targets, split=1, mean=train.mean, std=train.std, **kw)
    info = DatasetInfo(
        name="cluttered_fashion_mnist",
        num_classes=10,
        in_channels=1,
        image_size=(canvas_size, canvas_size),
        mean=train.mean,
        std=train.std,
        classes=FASHION_MNIST_CLASSES,
    )
    return DatasetSplits(train=train, train_eval=train, test=test, info=info)
