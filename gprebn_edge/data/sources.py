"""Every input the tool reads images from: a folder of images, a .npy/.npz array file or built-in synthetic
data, behind one re-iterable ImageSource that yields preprocessed batches in a fixed order.
numpy and Pillow only, so the runtime can share it without torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gprebn_edge.data.arrays import ArraySource, _load_arrays
from gprebn_edge.data.folder import IMAGE_EXTENSIONS, FolderSource
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.source_base import Batch, ImageSource
from gprebn_edge.data.stream import ShiftingStream
from gprebn_edge.data.synthetic_source import SyntheticSource
from gprebn_edge.data.synthetic_source import _parse_synthetic as _parse_synthetic  # re-exported for tests
from gprebn_edge.errors import InputError

__all__ = ["Batch", "ImageSource", "open_source", "collect", "IMAGE_EXTENSIONS", "FolderSource", "ArraySource",
           "ShiftingStream",
           "SyntheticSource"]

_EXPECTED = "expected a folder of images, a .npy/.npz file, synthetic:DOMAIN[:SEVERITY] or stream[:SEGMENTS]"


def open_source(spec: str, preprocess: Preprocess, *, shuffle: bool = True, seed: int = 0,
                limit: int | None = None, max_skip_fraction: float = 0.1) -> ImageSource:
    """Open a folder of images, a .npy/.npz file, synthetic:DOMAIN[:SEVERITY][:key=value...] or the built-in
    shifting stream stream[:SEGMENTS][:seed=N][:split=S] (always in its temporal order)."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise InputError(f"the fraction of unreadable images allowed must be in [0, 1], got "
                         f"{max_skip_fraction}")
    if spec == "stream" or spec.startswith("stream:"):
        return ShiftingStream(spec, preprocess, limit=limit)  # a stream keeps its order: shuffle/seed ignored
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return SyntheticSource(spec, preprocess, limit=limit)
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"cannot read data from {spec}: no such file or directory ({_EXPECTED})")
    if path.is_dir():
        return FolderSource(path, spec, preprocess, shuffle=shuffle, seed=seed, limit=limit,
                            max_skip_fraction=max_skip_fraction)
    if path.suffix.lower() in (".npy", ".npz"):
        images, labels = _load_arrays(path)
        return ArraySource(images, labels, spec, preprocess, name=str(path), shuffle=shuffle, seed=seed,
                           limit=limit)
    raise InputError(f"cannot read data from {spec}: {_EXPECTED}")


def collect(source: ImageSource, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
    """All of a source's images (float32 NCHW) and labels (or None), concatenated."""
    batches = list(source.batches(batch_size))
    images = np.concatenate([b.images for b in batches])
    labels = np.concatenate([b.labels for b in batches]) if source.has_labels else None
    return images, labels
