"""A fixed-size, mergeable latency histogram: log-spaced bins from 0.01 ms to 100 s, 8 per octave, so a
window's metrics record has a bounded size whatever its frame count, and a run's percentiles come from
merging its windows' histograms. numpy only.

A percentile is read as numpy's linear interpolation between the ranks around it, each rank's value taken as
its bin's geometric middle: a value inside the range is off by at most half a bin, 2**(1/16) - 1 = 4.4 %,
and so is the interpolation between two of them. Values below 0.01 ms or above 100 s are clamped into the
first or last bin.

On disk (JSON) a histogram is its non-empty bins as [index, count] pairs in index order."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from gprebn_edge.errors import ArtifactError

__all__ = ["LatencyHistogram", "check_layout", "LOW_MS", "PER_OCTAVE", "N_BINS", "MAX_RELATIVE_ERROR", "LAYOUT"]

LOW_MS = 0.01
HIGH_MS = 100_000.0
PER_OCTAVE = 8
N_BINS = math.ceil(math.log2(HIGH_MS / LOW_MS) * PER_OCTAVE)  # 187
MAX_RELATIVE_ERROR = 2 ** (0.5 / PER_OCTAVE) - 1
LAYOUT = {"low_ms": LOW_MS, "per_octave": PER_OCTAVE, "bins": N_BINS}  # stored with each record's histograms


class LatencyHistogram:
    """Counts of latencies (ms) per log-spaced bin."""

    def __init__(self, values: Iterable[float] = ()) -> None:
        self.counts = np.zeros(N_BINS, dtype=np.int64)
        self.add(values)

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def add(self, values: Iterable[float]) -> LatencyHistogram:
        v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
        if np.isnan(v).any():
            raise ValueError("a latency is NaN")
        with np.errstate(divide="ignore"):  # 0 ms -> -inf -> the first bin
            index = np.floor(np.log2(np.maximum(v, 0.0) / LOW_MS) * PER_OCTAVE)
        np.add.at(self.counts, np.clip(index, 0, N_BINS - 1).astype(np.int64), 1)
        return self

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        """Add `other`'s counts to this one (in place); returns self."""
        self.counts += other.counts
        return self

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100), None when empty."""
        n = self.n
        if n == 0:
            return None
        rank = q / 100 * (n - 1)
        lo, hi = math.floor(rank), math.ceil(rank)
        cum = np.cumsum(self.counts)
        a, b = (_middle(int(np.searchsorted(cum, r, side="right"))) for r in (lo, hi))
        return a + (b - a) * (rank - lo)

    def to_json(self) -> list[list[int]]:
        nonzero = np.flatnonzero(self.counts)
        return [[int(i), int(self.counts[i])] for i in nonzero]

    @classmethod
    def from_json(cls, pairs: Any, where: str) -> LatencyHistogram:
        """A histogram from its [index, count] pairs; ArtifactError naming `where` (the field) when malformed."""
        h = cls()
        if not isinstance(pairs, list):
            raise ArtifactError(f"{where} must be a list of [bin, count] pairs, got {type(pairs).__name__}")
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(x) for x in pair)
                    and 0 <= pair[0] < N_BINS and pair[1] >= 0):
                raise ArtifactError(f"{where} must be [bin, count] pairs with 0 <= bin < {N_BINS} and count >= 0, "
                                    f"got {pair!r:.60}")
            h.counts[pair[0]] += pair[1]
        return h

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LatencyHistogram) and bool((self.counts == other.counts).all())

    __hash__ = None  # type: ignore[assignment]  # mutable


def check_layout(layout: Any, where: str) -> None:
    """ArtifactError unless `layout` is the bin layout this version reads (LAYOUT)."""
    if layout != LAYOUT:
        raise ArtifactError(f"{where} has the bin layout {layout!r:.80}, this gprebn-edge reads {LAYOUT}: "
                            "summarize it with the version that wrote it")


def _middle(index: int) -> float:
    return LOW_MS * 2 ** ((index + 0.5) / PER_OCTAVE)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
