"""Small fake datasets in the exact on-disk formats of the real ones, for tests and examples without the real data.

Each writer makes a few images in a temporary folder so that the real reading code (IDX parsing, torchvision's CIFAR
reader, ``ImageFolder``) runs on them unchanged: ``build_loaders(name, root=folder, ...)`` then works offline. The
pixels are random; they carry no meaning.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dynnet.data._idx import write_idx

__all__ = ["write_fake_cifar", "write_fake_fashion_mnist", "write_fake_imagefolder"]


def write_fake_fashion_mnist(
    root: str | os.PathLike[str],
    *,
    num_train: int = 40,
    num_test: int = 20,
    seed: int = 0,
    compress: bool = True,
    layout: str = "flat",
) -> Path:
    """Write Fashion-MNIST-format IDX files with random items.

    Args:
        root: the folder to write under.
        num_train: training images (labels cycle through ``0 .. 9``).
        num_test: test images.
        seed: fixes the pixels.
        compress: write ``.gz`` files (as shipped) or plain ones (as torchvision extracts them).
        layout: ``"flat"`` (files directly in ``root``, like the Debian package) or ``"torchvision"``
            (``root/FashionMNIST/raw``).

    Returns:
        The folder holding the files.
    """
    if layout not in ("flat", "torchvision"):
        raise ValueError(f"layout must be 'flat' or 'torchvision', got {layout!r}")
    folder = Path(root) if layout == "flat" else Path(root) / "FashionMNIST" / "raw"
    rng = np.random.default_rng(seed)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        # An item: a random bright rectangle somewhere in the 28 × 28 patch, on a black background.
        for i in range(n):
            top, left = rng.integers(0, 14, size=2)
            height, width = rng.integers(6, 14, size=2)
            images[i, top : top + height, left : left + width] = rng.integers(64, 256, size=(height, width))
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8))
    return folder


class _Python2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    """Writes ``bytes`` as Python 2 ``str`` opcodes, as in the original CIFAR files (pickled by Python 2's cPickle).

    Loaded with ``encoding="latin1"`` (torchvision) their keys become ``str``; with ``encoding="bytes"`` (the CIFAR
    web page's recipe) they stay ``bytes`` such as ``b"data"``, exactly as with the real files.
    """

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def _save_python2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str


def _dump_python2(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue())


def write_fake_cifar(
    root: str | os.PathLike[str],
    *,
    num_classes: int = 10,
    per_batch: int = 4,
    num_test: int = 6,
    seed: int = 0,
) -> Path:
    """Write CIFAR-10 or CIFAR-100 files in the format of torchvision's extracted archives.

    CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``, each a pickled dict with
    ``b"data"`` (``uint8 [n, 3072]``: 1024 red, 1024 green, 1024 blue values, rows of 32) and ``b"labels"``.
    CIFAR-100: ``cifar-100-python/{train, test, meta}`` with ``b"fine_labels"`` and ``b"coarse_labels"``.
    The files do not match the published md5: read them with ``check_md5=False``.

    Args:
        root: the folder to write the CIFAR folder under.
        num_classes: 10 or 100.
        per_batch: images per training batch file (CIFAR-10 has 5 files; CIFAR-100 one of ``5 * per_batch``).
        num_test: test images.
        seed: fixes the pixels.

    Returns:
        The CIFAR folder (``root/cifar-10-batches-py`` or ``root/cifar-100-python``).
    """
    rng = np.random.default_rng(seed)

    def batch(n: int, label_key: bytes, offset: int) -> dict[bytes, Any]:
        labels = [(offset + i) % num_classes for i in range(n)]
        entry: dict[bytes, Any] = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), label_key: labels}
        if num_classes == 100:
            entry[b"coarse_labels"] = [label // 5 for label in labels]
        entry[b"filenames"] = [f"fake_{offset + i}.png".encode() for i in range(n)]
        return entry

    if num_classes == 10:
        folder = Path(root) / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for b in range(5):
            _dump_python2(folder / f"data_batch_{b + 1}", batch(per_batch, b"labels", b * per_batch))
        _dump_python2(folder / "test_batch", batch(num_test, b"labels", 0))
        names = [f"class{i}".encode() for i in range(10)]
        _dump_python2(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    elif num_classes == 100:
        folder = Path(root) / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        _dump_python2(folder / "train", batch(5 * per_batch, b"fine_labels", 0))
        _dump_python2(folder / "test", batch(num_test, b"fine_labels", 0))
        fine = [f"fine{i}".encode() for i in range(100)]
        coarse = [f"coarse{i}".encode() for i in range(20)]
        _dump_python2(folder / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse})
    else:
        raise ValueError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes}")
    return folder


def write_fake_imagefolder(
    root: str | os.PathLike[str],
    *,
    classes: tuple[str, ...] = ("cat", "dog"),
    per_class: int = 3,
    size: tuple[int, int] = (20, 24),
    seed: int = 0,
) -> Path:
    """Write an ImageNet-layout folder: ``root/{train,val}/<class>/*.{png,jpg}`` with random RGB images.

    Args:
        root: the folder to write under.
        classes: the class folder names.
        per_class: images per class and split (alternately PNG and JPEG).
        size: ``(height, width)`` of the images.
        seed: fixes the pixels.

    Returns:
        ``root``.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for name in classes:
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 == 0 else 'jpg'}")
    return Path(root)
