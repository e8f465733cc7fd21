"""One metrics window of the device loop: the per-frame figures of the frames served since the last record
(latency split by whether a round was running, entropy, accuracy and per-segment counts when labels exist).
numpy only.

A record keeps exact percentiles of its own window, and the window's latencies as two histograms (idle,
adapting) under "latency_hist_ms", with their bin layout: a record's size is bounded whatever its frame
count, and a run's percentiles come from merging them (see `histogram`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gprebn_edge.device.histogram import LAYOUT, LatencyHistogram
from gprebn_edge.runtime import metrics

__all__ = ["Window", "frame_predictions"]


def frame_predictions(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's class and confidence (top softmax probability); a frame with non-finite logits gets
    class -1 and confidence NaN (counted wrong)."""
    finite = np.isfinite(logits).all(1)
    safe = np.where(finite[:, None], logits, 0.0)
    return np.where(finite, safe.argmax(1), -1), np.where(finite, metrics.confidence(safe), np.nan)


class Window:
    """Per-frame figures of one metrics window."""

    def __init__(self) -> None:
        self.logits: list[np.ndarray] = []
        self.ms: list[float] = []
        self.busy: list[bool] = []
        self.labels: list[int | None] = []
        self.segments: list[str | None] = []
        self.frames: list[int] = []

    @property
    def n(self) -> int:
        return len(self.ms)

    def add(self, logits: np.ndarray, ms: float, busy: bool, label: int | None, segment: str | None,
            frame: int) -> None:
        self.frames.append(frame)
        self.logits.append(logits)
        self.ms.append(ms)
        self.busy.append(busy)
        self.labels.append(label)
        self.segments.append(segment)

    def record(self) -> dict[str, Any]:
        logits = np.stack(self.logits)
        finite = np.isfinite(logits).all(1)
        pred, _ = frame_predictions(logits)
        ent = metrics.entropy(logits[finite]) if finite.any() else np.array([np.nan])
        ms = np.asarray(self.ms)
        busy = np.asarray(self.busy)
        labeled = [i for i, y in enumerate(self.labels) if y is not None]
        correct = [int(pred[i] == self.labels[i]) for i in labeled]
        segment_frames: dict[str, list[int]] = {}  # name -> [first frame, last frame + 1] within this window
        for name, frame in zip(self.segments, self.frames, strict=True):
            if name is not None:
                span = segment_frames.setdefault(name, [frame, frame + 1])
                span[1] = frame + 1
        by_segment: dict[str, list[int]] = {}
        for i, c in zip(labeled, correct, strict=True):
            name = self.segments[i]
            if name is not None:
                by_segment.setdefault(name, [0, 0])
                by_segment[name][0] += c
                by_segment[name][1] += 1
        return {"n": self.n, "latency_ms": metrics.latency_summary(ms),
                "latency_idle_ms": metrics.latency_summary(ms[~busy], (50, 99), allow_empty=True),
                "latency_adapting_ms": metrics.latency_summary(ms[busy], (50, 99), allow_empty=True),
                "adapting_fraction": float(busy.mean()),
                "mean_entropy": float(ent.mean()), "non_finite": int((~finite).sum()), "labeled": len(labeled),
                "correct": sum(correct) if labeled else None, "by_segment": by_segment,
                "segment_frames": segment_frames,
                "latency_hist_ms": {**LAYOUT, "idle": LatencyHistogram(ms[~busy]).to_json(),
                                    "adapting": LatencyHistogram(ms[busy]).to_json()}}
