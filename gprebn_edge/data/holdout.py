"""Hold back the first images of a source: `adapt` checks the adapted model on images it never adapted on.

The held-back images are the first `k` of the source's order (a seeded random sample for a shuffled folder,
the oldest frames of a stream read with --no-shuffle); the rest is a source of its own, re-batched so that
every calibration batch but the last is full. Neither part is held in memory: each pass over either reads its
images again (the first `k` are cheap to read; a pass over the rest reads them too and drops them). numpy
only."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from gprebn_edge.data.source_base import Batch, ImageSource

__all__ = ["Head", "WithoutHead", "split_holdout"]


class Head(ImageSource):
    """The first `k` readable items of `parent`, read again on every pass (held-back images cost one batch)."""

    kind = "head"

    def __init__(self, parent: ImageSource, k: int) -> None:
        super().__init__(parent.spec, parent.preprocess, min(max(k, 0), len(parent)), shuffle=False, seed=0,
                         limit=None)
        self.parent = parent
        self.k = k
        self.has_labels = parent.has_labels
        self.class_names = parent.class_names
        self.skipped = parent.skipped

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        taken = 0
        if self.k <= 0:
            return
        for batch in self.parent.batches(min(batch_size, self.k)):
            n = min(len(batch.images), self.k - taken)
            yield _slice(batch, 0, n)
            taken += n
            if taken >= self.k:
                return  # before the parent reads another batch

    def _hash(self, update: Callable[[bytes], None]) -> None:
        for batch in self.batches(64):
            update(batch.raw.tobytes())


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    labels = None if batch.labels is None else batch.labels[start:stop]
    return Batch(batch.images[start:stop], labels, batch.raw[start:stop])


def _concat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    labels = None if parts[0].labels is None else np.concatenate([p.labels for p in parts])  # type: ignore[misc]
    return Batch(np.concatenate([p.images for p in parts]), labels, np.concatenate([p.raw for p in parts]))


class WithoutHead(ImageSource):
    """`parent` without its first `skip` readable items."""

    kind = "without-head"

    def __init__(self, parent: ImageSource, skip: int) -> None:
        super().__init__(parent.spec, parent.preprocess, max(len(parent) - skip, 0), shuffle=False, seed=0,
                         limit=None)
        self.parent = parent
        self.skip = skip
        self.has_labels = parent.has_labels
        self.class_names = parent.class_names
        self.skipped = parent.skipped  # unreadable files are the parent's, counted once

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        seen = 0
        pending: list[Batch] = []
        held = 0
        for batch in self.parent.batches(batch_size):
            n = len(batch.images)
            start = min(max(self.skip - seen, 0), n)
            seen += n
            if start == n:
                continue
            pending.append(_slice(batch, start, n))
            held += n - start
            while held >= batch_size:
                whole = _concat(pending)
                yield _slice(whole, 0, batch_size)
                rest = _slice(whole, batch_size, held)
                held -= batch_size
                pending = [rest] if held else []
        if held:
            yield _concat(pending)

    def describe(self) -> dict:
        return {**self.parent.describe(), "held_back": self.skip}

    def fingerprint(self) -> str:
        return self.parent.fingerprint()  # the calibration data is the parent's; describe() says what was held

    def _hash(self, update: Callable[[bytes], None]) -> None:  # pragma: no cover - fingerprint() overrides
        update(self.parent.fingerprint().encode())


def split_holdout(source: ImageSource, k: int) -> tuple[ImageSource, Head | None]:
    """(the source to adapt on, the held-back first `k` images); with k = 0 the source itself and None."""
    if k <= 0:
        return source, None
    return WithoutHead(source, k), Head(source, k)
