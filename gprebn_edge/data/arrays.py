"""Images stored in a .npy/.npz array file (NHWC, NCHW or grayscale NHW; uint8 or float in [0, 1]),
read without unpickling and checked before use."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np

from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.source_base import Batch, ImageSource
from gprebn_edge.errors import InputError
from gprebn_edge.validate import check_size, oneline

__all__ = ["ArraySource"]

_CHUNK = 256  # images per chunk when validating or hashing arrays


def _layout(shape: tuple[int, ...], name: str) -> str:
    if len(shape) == 3:
        if shape[-1] in (3, 4):
            raise InputError(f"{name} has shape {shape}, which looks like one HxWxC image: store a batch "
                             "(N, H, W, C), e.g. with np.expand_dims(x, 0)")
        return "nhw"
    if len(shape) == 4:
        if shape[-1] in (1, 3):
            return "nhwc"
        if shape[1] in (1, 3):
            return "nchw"
        raise InputError(f"{name} has shape {shape}: expected 1 or 3 channels, as (N, H, W, C) or "
                         "(N, C, H, W)")
    raise InputError(f"{name} has {len(shape)} dimensions (shape {shape}): expected images as (N, H, W, C), "
                     "(N, C, H, W) or grayscale (N, H, W)")


def _check_values(images: np.ndarray, name: str) -> None:
    """Reject non-finite values and ranges other than uint8 or [0, 1], chunk by chunk (may be a memmap)."""
    if images.dtype == np.uint8:
        return
    is_float = np.issubdtype(images.dtype, np.floating)
    if not (is_float or np.issubdtype(images.dtype, np.integer)):
        raise InputError(f"{name} has dtype {images.dtype}: store uint8 (0..255) or float in [0, 1]")
    for start in range(0, len(images), _CHUNK):
        x = np.asarray(images[start:start + _CHUNK])
        if is_float and not np.isfinite(x).all():
            raise InputError(f"{name} contains NaN or Inf values (near image {start}): fix the data")
        lo, hi = x.min(), x.max()
        if is_float and (lo < -0.01 or hi > 1.01):
            raise InputError(f"{name} holds float values in [{lo:.3g}, {hi:.3g}]: scale them to [0, 1] "
                             "or store uint8")
        if not is_float and (lo < 0 or hi > 255):
            raise InputError(f"{name} holds {images.dtype} values in [{lo}, {hi}]: store uint8 (0..255) "
                             "or float in [0, 1]")


def _check_labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise InputError(f"labels in {name} have shape {labels.shape}: expected one class index per image")
    if len(labels) != n:
        raise InputError(f"{name} has {n} images but {len(labels)} labels: they must match one to one")
    if np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() and (labels % 1 == 0).all():
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
        raise InputError(f"labels in {name} must be non-negative integer class indices")
    return labels.astype(np.int64)


def _sniff(path: Path) -> str:
    """"npy" or "npz" by the file's first bytes; InputError naming what it is otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "npz"
    if head.startswith(b"\x80") or not head:
        what = "is empty" if not head else "is a Python pickle"
        raise InputError(f"{path} {what}, not a .npy or .npz array file: save the images with np.save or np.savez")
    kind = "a zip archive (.npz)" if path.suffix.lower() == ".npz" else "a .npy array file"
    raise InputError(f"{path} is not {kind} (it starts with {head[:6]!r}): save the images with np.save or "
                     "np.savez")


def _header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a .npy stream declares (numpy's public header readers; nothing is unpickled)."""
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f, max_header_size=10_000)
    return shape, dtype


def _check_declared(path: Path, shape: tuple[int, ...], dtype: np.dtype, available: int | None, *,
                    loaded: bool) -> None:
    """Refuse, before reading, an array whose declared shape needs more bytes than the file holds or, when it
    is `loaded` into memory (an .npz member; a .npy is memory-mapped), more memory than allowed."""
    need = math.prod(shape) * dtype.itemsize
    if loaded:
        check_size(need, f"{path} (declared shape {shape}, {dtype})", "store fewer or smaller images, or save "
                   "them with np.save as .npy (read from disk as needed)")
    if available is not None and need > available:
        raise InputError(f"{path} declares shape {shape} ({dtype}), {need} bytes, but holds only {available}: the "
                         "file is truncated or corrupt")


def _npz_member(archive: zipfile.ZipFile, key: str, path: Path) -> None:
    """Check an .npz member's declared array size against the limit and its stored size, before loading it."""
    try:
        info = archive.getinfo(f"{key}.npy")
        with archive.open(info) as f:
            shape, dtype = _header(f)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"cannot read '{key}' in {path}: {oneline(e)}") from None
    if dtype.hasobject:
        return  # refused, without unpickling, by np.load below
    _check_declared(Path(f"{path}['{key}']"), shape, dtype, info.file_size, loaded=True)


def _load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    refuse = (f"{path} holds Python objects (an object array or pickled data); it is not loaded, since "
              "unpickling can run arbitrary code: store a numeric uint8 or float array")
    kind = _sniff(path)
    if kind == "npy":
        try:
            with open(path, "rb") as f:
                shape, dtype = _header(f)
                offset = f.tell()
        except (ValueError, OSError, EOFError) as e:
            raise InputError(f"cannot read {path}: its .npy header is malformed ({oneline(e)})") from None
        if dtype.hasobject:
            raise InputError(refuse)
        _check_declared(path, shape, dtype, path.stat().st_size - offset, loaded=False)
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    if name.endswith(".npy"):
                        _npz_member(archive, name[:-4], path)
        except zipfile.BadZipFile as e:
            raise InputError(f"{path} is not a readable .npz (zip) file: {oneline(e)}") from None
    try:
        obj = np.load(path, allow_pickle=False, mmap_mode="r")  # .npy stays on disk; batches read slices
        if isinstance(obj, np.ndarray):
            return obj, None
        with obj:
            keys = list(obj.files)
            label_key = next((k for k in ("labels", "y") if k in keys), None)
            image_key = next((k for k in ("images", "x") if k in keys), None)
            if image_key is None:
                rest = [k for k in keys if k != label_key]
                if len(rest) != 1:
                    raise InputError(f"{path} holds arrays {keys}: put the images under 'images' or 'x' "
                                     "(and labels under 'labels' or 'y')")
                image_key = rest[0]
            return obj[image_key], None if label_key is None else obj[label_key]
    except ValueError as e:
        if "pickle" in str(e) or "object" in str(e).lower():
            raise InputError(refuse) from None
        raise InputError(f"cannot read {path}: {e}") from None
    except (OSError, EOFError) as e:
        raise InputError(f"cannot read {path}: {e or type(e).__name__}") from None


class ArraySource(ImageSource):
    kind = "array"

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, spec: str, preprocess: Preprocess, *,
                 name: str, shuffle: bool, seed: int, limit: int | None) -> None:
        self.layout = _layout(images.shape, name)
        if len(images) == 0:
            raise InputError(f"{name} holds no images")
        _check_values(images, name)
        self.images = images
        self.labels = None if labels is None else _check_labels(labels, len(images), name)
        super().__init__(spec, preprocess, len(images), shuffle=shuffle, seed=seed, limit=limit)
        self.has_labels = self.labels is not None

    def _raw(self, idx: np.ndarray) -> np.ndarray:
        """Stored images at idx as uint8 NHWC, before geometry."""
        x = np.asarray(self.images[idx])
        if self.layout == "nhw":
            x = x[..., None]
        elif self.layout == "nchw":
            x = x.transpose(0, 2, 3, 1)
        if x.dtype != np.uint8:
            x = np.rint(np.clip(x, 0, 1) * 255) if np.issubdtype(x.dtype, np.floating) else x
            x = x.astype(np.uint8)
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        return np.ascontiguousarray(x)

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self.order), batch_size):
            idx = self.order[start:start + batch_size]
            raw = self.preprocess.geometry_array(self._raw(idx))
            yield self._batch(raw, None if self.labels is None else self.labels[idx])

    def _hash(self, update: Callable[[bytes], None]) -> None:
        update(f"{self.images.dtype.str}\0{self.images.shape[1:]}\0".encode())
        for start in range(0, len(self.order), _CHUNK):
            update(np.ascontiguousarray(self.images[self.order[start:start + _CHUNK]]).tobytes())
        if self.labels is not None:
            update(self.labels[self.order].tobytes())
