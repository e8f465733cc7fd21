"""The IDX reader on small files written here (no dependency on the installed Fashion-MNIST)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from gprebn_edge.data.idx import load_fashion_mnist, read_idx, read_idx_pair, to_rgb32
from gprebn_edge.errors import InputError


def idx_bytes(array: np.ndarray, code: int | None = None) -> bytes:
    codes = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    be = array.astype(array.dtype.newbyteorder(">"))
    code = codes[be.dtype] if code is None else code
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + be.tobytes()


def write(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("dtype", ["u1", "i1", "<i2", "<i4", "<f4", "<f8"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip(tmp_path: Path, dtype: str, suffix: str) -> None:
    a = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4)
    a = (a % 256).astype(dtype) if dtype == "u1" else a.astype(dtype)
    out = read_idx(write(tmp_path / f"a.idx{suffix}", idx_bytes(a)))
    assert out.dtype.isnative and out.dtype.kind == np.dtype(dtype).kind and out.shape == a.shape
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00", "too short for an IDX header"),
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "not an IDX file"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x07", "unknown IDX type code 0x07"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x01", "too short for a 3-dimensional IDX header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x07", "needs 11: the file is truncated or corrupt"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x07\x07", "needs 9"),
])
def test_bad_headers_fail_with_one_line_naming_the_file(tmp_path: Path, data: bytes, message: str) -> None:
    path = write(tmp_path / "bad-idx1-ubyte.gz", data)
    with pytest.raises(InputError, match=message) as e:
        read_idx(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_not_gzip_and_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read it"):
        plain = tmp_path / "plain.gz"
        plain.write_bytes(idx_bytes(np.zeros(3, np.uint8)))  # named .gz but not gzipped
        read_idx(plain)
    with pytest.raises(InputError, match="no such file"):
        read_idx(tmp_path / "absent.gz")


def fake_fashion(root: Path, split: str, n: int, labels: np.ndarray | None = None) -> np.ndarray:
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10 if labels is None else labels
    write(root / f"{split}-images-idx3-ubyte.gz", idx_bytes(images))
    write(root / f"{split}-labels-idx1-ubyte.gz", idx_bytes(labels))
    return images


def test_fashion_layout_and_checks(tmp_path: Path) -> None:
    images = fake_fashion(tmp_path, "t10k", 12)
    x, y = load_fashion_mnist("t10k", tmp_path)
    np.testing.assert_array_equal(x, images)
    assert y.dtype == np.int64 and list(y[:11]) == [*range(10), 0]
    rgb = to_rgb32(x)
    assert rgb.shape == (12, 32, 32, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[:, 2:30, 2:30, 1], x)
    assert not rgb[:, :2].any() and not rgb[:, :, 30:].any()
    assert (rgb[..., 0] == rgb[..., 2]).all()

    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(InputError, match="use train or t10k"):
        load_fashion_mnist("test", tmp_path)
    fake_fashion(tmp_path, "train", 3, labels=np.array([0, 1, 10], np.uint8))
    with pytest.raises(InputError, match=r"labels span 0..10, expected 0..9"):
        load_fashion_mnist("train", tmp_path)


def test_pair_mismatch(tmp_path: Path) -> None:
    im = write(tmp_path / "im.gz", idx_bytes(np.zeros((3, 2, 2), np.uint8)))
    lb = write(tmp_path / "lb.gz", idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(InputError, match="4 labels for 3 images"):
        read_idx_pair(im, lb)
    with pytest.raises(InputError, match=r"expected uint8 images \(N, H, W\)"):
        read_idx_pair(lb, lb)
