"""IDX reading: round trips through files we write, and clear errors naming the file for every kind of damage."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynnet.data import read_idx, write_idx


@pytest.mark.parametrize("name", ["images-idx3-ubyte.gz", "images-idx3-ubyte"])
def test_round_trip_uint8_images(tmp_path: Path, name: str) -> None:
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    path = write_idx(tmp_path / name, images)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    out = read_idx(path, expected_ndim=3)
    assert out.dtype == torch.uint8
    torch.testing.assert_close(out, images, rtol=0, atol=0)


def test_header_is_big_endian_idx(tmp_path: Path) -> None:
    labels = np.array([3, 1, 4], dtype=np.uint8)
    raw = write_idx(tmp_path / "labels", labels).read_bytes()
    # magic 0x00000801 (uint8, 1 dimension), then the size 3 as big-endian int32, then the values.
    assert raw == bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 3, 1, 4])


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    dtype=st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]),
    compress=st.booleans(),
)
def test_round_trip_any_shape_and_dtype(tmp_path_factory: pytest.TempPathFactory, shape, dtype, compress) -> None:
    values = (np.arange(int(np.prod(shape))) % 100 - 50).astype(dtype).reshape(shape)
    path = write_idx(tmp_path_factory.mktemp("idx") / "x.idx", values, compress=compress)
    out = read_idx(path)
    assert tuple(out.shape) == tuple(shape)
    np.testing.assert_array_equal(out.numpy(), values)


def _write_raw(path: Path, payload: bytes, *, compress: bool = True) -> Path:
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2]) + bytes(7), "truncated"),  # 8 values declared
        (bytes([0, 0, 8, 1, 0, 0, 0, 2]) + bytes(3), "longer than declared"),
        (bytes([0, 0, 8, 3, 0, 0, 0, 2]), "truncated inside its header"),
        (bytes([1, 2, 8, 1, 0, 0, 0, 1, 0]), "bad magic number"),
        (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 0]), "unknown type code"),
        (bytes([0, 0]), "too short"),
    ],
)
def test_damaged_file_raises_value_error_naming_it(tmp_path: Path, payload: bytes, match: str) -> None:
    path = _write_raw(tmp_path / "broken-idx3-ubyte.gz", payload)
    with pytest.raises(ValueError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_cut_gzip_stream_raises_value_error_naming_file(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good.gz", torch.zeros(50, 28, 28, dtype=torch.uint8)).read_bytes()
    path = tmp_path / "cut-images-idx3-ubyte.gz"
    path.write_bytes(good[: len(good) // 2])  # an interrupted download
    with pytest.raises(ValueError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_unexpected_ndim_is_rejected(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels.gz", torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="declares 1 dimensions, expected 3"):
        read_idx(path, expected_ndim=3)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent.gz")


def test_write_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot store dtype"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.uint16))
