"""IDX files (the MNIST / Fashion-MNIST format), plain or gzipped, and Fashion-MNIST as 32x32 RGB.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one big-endian
uint32 per dimension, then the values in row-major order, big-endian. Every header field and the payload
size are checked; a bad file fails with one line that names it.

Fashion-MNIST's 28x28 grayscale images enter the built-in models as 32x32 RGB uint8: zero-padded by two
pixels on each side (its background is black, so the pad is more background, not a frame) and the gray
value replicated to three channels. That is the format of the built-in data, so the project's corruptions
(CIFAR-10-C's 32x32 constants) apply unchanged and `builtin:small_resnet` runs on it without resizing,
which would blur the images before any corruption does."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from gprebn_edge.errors import InputError

__all__ = ["IDX_DTYPES", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "read_idx", "read_idx_pair",
           "load_fashion_mnist", "to_rgb32"]

# type code -> big-endian numpy dtype
IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                          "Shirt", "Sneaker", "Bag", "Ankle boot")
_INSTALL = "apt-get install dataset-fashion-mnist"


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (gzipped when the name ends in .gz), in native byte order."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, EOFError) as e:  # gzip raises BadGzipFile (an OSError) or EOFError when truncated
        raise InputError(f"{path}: cannot read it ({e or type(e).__name__})") from None
    if len(data) < 4:
        raise InputError(f"{path}: {len(data)} bytes, too short for an IDX header")
    if data[0] != 0 or data[1] != 0:
        raise InputError(f"{path}: not an IDX file (magic starts {data[:2].hex()}, expected 0000)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise InputError(f"{path}: unknown IDX type code 0x{code:02x} (expected one of "
                         f"{', '.join(f'0x{c:02x}' for c in IDX_DTYPES)})")
    if ndim == 0:
        raise InputError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise InputError(f"{path}: {len(data)} bytes, too short for a {ndim}-dimensional IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    dtype = np.dtype(IDX_DTYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise InputError(f"{path}: {len(data)} bytes, but its header (shape {shape}, {dtype.name}) needs "
                         f"{expected}: the file is truncated or corrupt")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx_pair(images_path: str | Path, labels_path: str | Path,
                  num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels (N,) int64 from two IDX files, checked against each other."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise InputError(f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{labels_path}: expected integer labels (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise InputError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    if len(labels) and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        raise InputError(f"{labels_path}: labels span {labels.min()}..{labels.max()}, expected 0.."
                         f"{(num_classes or 1) - 1}")
    return images, labels.astype(np.int64)


def load_fashion_mnist(split: str, root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's `train` (60,000) or `t10k` (10,000) split as 28x28 uint8 images and int64 labels."""
    if split not in ("train", "t10k"):
        raise InputError(f"unknown Fashion-MNIST split {split!r}: use train or t10k")
    root = Path(root)
    images = root / f"{split}-images-idx3-ubyte.gz"
    labels = root / f"{split}-labels-idx1-ubyte.gz"
    missing = [p for p in (images, labels) if not p.is_file()]
    if missing:
        raise InputError(f"Fashion-MNIST not found ({missing[0]} is missing): {_INSTALL}")
    return read_idx_pair(images, labels, num_classes=len(FASHION_MNIST_CLASSES))


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """Grayscale (N, 28, 28) uint8 -> (N, 32, 32, 3) uint8: zero-pad two pixels a side, replicate the gray."""
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise InputError(f"to_rgb32 needs uint8 images (N, 28, 28), got {images.dtype} {images.shape}")
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.ascontiguousarray(np.repeat(padded[..., None], 3, axis=-1))
