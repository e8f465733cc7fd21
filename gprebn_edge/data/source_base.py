"""The base every image source builds on: Batch and ImageSource, a finite, re-iterable stream of
preprocessed batches in a fixed order. numpy only."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.validate import flag_number

__all__ = ["Batch", "ImageSource"]


@dataclass
class Batch:
    images: np.ndarray  # float32 NCHW, preprocessed
    labels: np.ndarray | None  # int64 (N,), None when the source has no labels
    raw: np.ndarray  # uint8 NHWC after geometry, before normalization


class ImageSource(ABC):
    """A finite stream of images in a fixed order (shuffled once, by seed); each batches() call replays it."""

    kind = "base"

    def __init__(self, spec: str, preprocess: Preprocess, n: int, *, shuffle: bool, seed: int,
                 limit: int | None) -> None:
        self.spec = spec
        self.preprocess = preprocess
        self.has_labels = False
        self.class_names: list[str] | None = None
        self.skipped: list[tuple[str, str]] = []
        self.shuffle = shuffle
        self.seed = seed
        self.limit = limit
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        self.order = order[:limit]
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.order)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        flag_number(batch_size, "batch size", low=1)
        return self._batches(batch_size)

    def fingerprint(self) -> str:
        """sha256 over the content in iteration order; computed once."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            self._hash(h.update)
            self._fingerprint = "sha256:" + h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "count": len(self), "has_labels": self.has_labels,
                "class_names": self.class_names, "skipped": len(self.skipped), "shuffle": self.shuffle,
                "seed": self.seed if self.shuffle else None, "limit": self.limit}

    @abstractmethod
    def _batches(self, batch_size: int) -> Iterator[Batch]:
        """Yield the preprocessed batches in self.order."""

    @abstractmethod
    def _hash(self, update: Callable[[bytes], None]) -> None:
        """Feed the content, in iteration order, to a hash."""

    def _batch(self, raw: np.ndarray, labels: np.ndarray | None) -> Batch:
        return Batch(self.preprocess.normalize(raw), labels, raw)
