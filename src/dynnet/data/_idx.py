"""Reader and writer for the IDX format of (Fashion-)MNIST, gzip-compressed or not.

The format (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number ``0x00 0x00 <dtype> <ndim>``, then ``ndim``
big-endian ``int32`` sizes, then the values, big-endian, in C order. We read it with ``numpy`` in one pass, which is
several times faster than ``torchvision``'s reader, and we validate everything a truncated download or a wrong file can
break, so that a bad file fails here, naming itself, and not later as a shape error.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_idx", "write_idx"]

# IDX type code → big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != _GZIP_MAGIC:  # sniff, do not trust the extension: torchvision keeps both forms side by side
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut file is an EOFError
        raise ValueError(f"IDX file {path} is not a valid gzip stream (truncated or corrupt download?): {err}") from err


def read_idx(path: str | os.PathLike[str], *, expected_ndim: int | None = None) -> torch.Tensor:
    """Read an IDX file (plain or gzip) into a tensor.

    Args:
        path: the file, e.g. ``train-images-idx3-ubyte.gz``.
        expected_ndim: if given, the number of dimensions the file must declare (3 for images, 1 for labels).

    Returns:
        Tensor of the file's shape, e.g. ``Tensor[N, H, W]`` (``uint8``) for images, ``Tensor[N]`` for labels. The
        dtype follows the file's type code (``uint8`` for every MNIST-family file).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming ``path``, if the magic number, type code, dimensions or length are wrong.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"IDX file {path} is too short ({len(data)} bytes) to hold a header")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(f"IDX file {path} has a bad magic number {data[:4].hex()} (expected 0000<type><ndim>)")
    if type_code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"IDX file {path} has unknown type code 0x{type_code:02X}; known: {known}")
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"IDX file {path} declares {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"IDX file {path} is truncated inside its header ({len(data)} < {header} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    if any(d < 0 for d in dims):
        raise ValueError(f"IDX file {path} declares negative dimensions {dims}")
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "longer than declared"
        raise ValueError(
            f"IDX file {path} is {what}: dimensions {dims} need {expected} data bytes, found {got} "
            "(re-install or re-download it)"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    # astype(native) copies into a writable, native-endian array that torch can own.
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: str | os.PathLike[str], values: torch.Tensor | np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``values`` as an IDX file (the inverse of :func:`read_idx`).

    Useful to make small fake datasets in the exact on-disk format of the real ones (tests, examples).

    Args:
        path: the file to write; parent folders are created.
        values: ``Tensor[...]`` or array of ``uint8``, ``int8``, ``int16``, ``int32``, ``float32`` or ``float64``.
        compress: gzip the file; by default when ``path`` ends in ``.gz``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    array = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; supported: {', '.join(str(d) for d in codes)}")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, compresslevel=1) if compress else payload)
    return path
