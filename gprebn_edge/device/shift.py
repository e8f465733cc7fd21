"""A cheap shift detector for the serving thread: it tells the device loop to start an adaptation round
early when the stream's inputs or the serving model's outputs move away from a reference window.
Pure numpy, no torch, no I/O.

Per served frame it keeps four small things in a ring buffer of the last `window` frames: the image's
per-channel mean and mean of squares, the normalized softmax entropy of the serving model's logits and
their top-1 class. `check()` compares the recent window with a reference window (`set_reference()`):

- input:     max over channels of |mean_recent - mean_ref| / std_ref + |log(std_recent / std_ref)|, where
             std is the pixel standard deviation over a whole window (floor 1e-3);
- entropy:   |change| of the mean softmax entropy / log(C);
- diversity: |change| of the entropy of the predicted-class histogram / log(C).

The defaults (window 64, thresholds 1.0 / 0.1 / 0.2) and the measurements they rest on are in
benchmarks/results/shift_thresholds.md (stationary noise, and the frames to detection at each change of the
built-in stream); `tests/device/test_shift.py` reruns them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gprebn_edge.errors import InputError
from gprebn_edge.runtime import metrics

__all__ = ["ShiftConfig", "ShiftDetector", "ShiftTrigger"]

_STD_FLOOR = 1e-3


@dataclass(frozen=True)
class ShiftConfig:
    """window: frames in the recent (and the reference) window; the thresholds: see the module docstring and
    benchmarks/results/shift_thresholds.md."""

    window: int = 64
    input_threshold: float = 1.0
    entropy_threshold: float = 0.1
    diversity_threshold: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 2:
            raise InputError(f"shift window must be an integer of at least 2 frames, got {self.window!r}")
        for name in ("input_threshold", "entropy_threshold", "diversity_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise InputError(f"shift threshold {name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True)
class _Summary:
    """One window, reduced: per-channel pixel mean and std, mean normalized entropy, class-histogram
    entropy / log C."""

    mean: np.ndarray
    std: np.ndarray
    entropy: float
    diversity: float


def _summarize(means: np.ndarray, squares: np.ndarray, entropies: np.ndarray, preds: np.ndarray,
               classes: int) -> _Summary:
    """A window (or a batch) of frames reduced: per-frame channel means and mean squares (n, C), normalized
    entropies (n,) and predicted classes (n,) -> per-channel pixel mean and std over all its pixels, mean
    entropy, and class-histogram entropy / log C."""
    mean = means.mean(axis=0)
    var = np.maximum(squares.mean(axis=0) - np.square(mean), 0.0)
    hist = np.bincount(preds, minlength=classes)
    return _Summary(mean, np.maximum(np.sqrt(var), _STD_FLOOR), float(entropies.mean()),
                    metrics.histogram_entropy(hist) / math.log(classes))


class ShiftDetector:
    """Call update() once per served frame, set_reference() once the window is full (and after each
    swap), check() whenever a decision is wanted; check() does not latch, so it keeps returning a reason
    until the caller sets a new reference."""

    def __init__(self, config: ShiftConfig | None = None) -> None:
        self.config = config or ShiftConfig()
        self.reset()

    def reset(self) -> None:
        """Forget every frame and the reference."""
        self._channels: int | None = None
        self._classes: int | None = None
        self._mean = self._sq = np.empty((0, 0))
        self._entropy = np.empty(0)
        self._pred = np.empty(0, dtype=np.int64)
        self._count = 0     # frames recorded since the last reset
        self._skipped = 0   # frames with non-finite image or logits, not recorded
        self._reference: _Summary | None = None

    @property
    def full(self) -> bool:
        """Whether the recent window holds `window` frames."""
        return self._count >= self.config.window

    @property
    def has_reference(self) -> bool:
        """Whether set_reference() has been called since the last reset."""
        return self._reference is not None

    def update(self, image: np.ndarray, logits: np.ndarray) -> None:
        """Record one frame: a (C, H, W) image as the model sees it and the serving model's (classes,)
        logits. A frame with NaN or Inf in either is counted as skipped, not recorded."""
        image = np.asarray(image)
        logits = np.asarray(logits)
        if image.ndim != 3 or logits.ndim != 1 or logits.shape[0] < 2:
            raise InputError(f"a shift-detector frame is a (C, H, W) image and (classes >= 2,) logits, got "
                             f"shapes {image.shape} and {logits.shape}")
        self._same_model(image.shape[0], logits.shape[0], "frame")
        flat = image.reshape(image.shape[0], -1).astype(np.float64)
        z = logits.astype(np.float64)
        if not (np.isfinite(flat).all() and np.isfinite(z).all()):
            self._skipped += 1
            return
        i = self._count % self.config.window
        self._mean[i] = flat.mean(axis=1)
        self._sq[i] = np.square(flat).mean(axis=1)
        self._entropy[i] = float(metrics.entropy(z[None])[0]) / math.log(len(z))
        self._pred[i] = int(z.argmax())
        self._count += 1

    def set_reference(self) -> None:
        """Make the recent window the reference; InputError before the window is full."""
        if not self.full:
            raise InputError(f"the shift detector's reference needs a full window: {self._count} of "
                             f"{self.config.window} frames so far")
        self._reference = self._summary()

    def set_reference_from(self, images: np.ndarray, logits: np.ndarray) -> None:
        """Make a batch the reference: (N, C, H, W) images and the (N, classes) logits the serving model gives
        on them. The device loop passes the held-back frames a candidate was gated on and its logits there,
        so that after a swap the reference is the domain the new model was adapted for, and a stream that
        moved on while the round ran is caught as soon as a window of the new model's outputs is full."""
        images, logits = np.asarray(images), np.asarray(logits)
        if images.ndim != 4 or logits.ndim != 2 or len(images) != len(logits) or not len(images):
            raise InputError(f"a shift reference is (N, C, H, W) images and their (N, classes) logits, got shapes "
                             f"{images.shape} and {logits.shape}")
        self._same_model(images.shape[1], logits.shape[1], "reference")
        flat = images.reshape(len(images), images.shape[1], -1).astype(np.float64)
        z = logits.astype(np.float64)
        keep = np.isfinite(flat).all(axis=(1, 2)) & np.isfinite(z).all(axis=1)
        if not keep.any():
            raise InputError("a shift reference needs at least one frame with finite pixels and logits")
        flat, z = flat[keep], z[keep]
        self._reference = _summarize(flat.mean(axis=2), np.square(flat).mean(axis=2),
                                     metrics.entropy(z) / math.log(z.shape[1]), z.argmax(axis=1), z.shape[1])

    def check(self) -> str | None:
        """None, or one line saying what moved past its threshold (the largest relative move first)."""
        if self._reference is None or not self.full:
            return None
        moves = self._moves(self._summary())
        c = self.config
        over = [(value / limit, f"{what} moved {value:.2f}{unit} (threshold {limit})")
                for (what, unit), value, limit in zip(_WHAT, moves, (c.input_threshold, c.entropy_threshold,
                                                                     c.diversity_threshold), strict=True)
                if value >= limit]
        return max(over)[1] if over else None

    def state(self) -> dict[str, Any]:
        """JSON-safe numbers for the metrics log: frames seen, and the current moves (None until a
        reference and a full window exist)."""
        moves: tuple[float | None, ...] = (None, None, None)
        if self._reference is not None and self.full:
            moves = tuple(round(m, 4) for m in self._moves(self._summary()))
        return {"frames": self._count, "skipped": self._skipped, "reference": self._reference is not None,
                "input_move": moves[0], "entropy_move": moves[1], "diversity_move": moves[2]}

    def _start(self, channels: int, classes: int) -> None:
        w = self.config.window
        self._channels, self._classes = channels, classes
        self._mean = np.zeros((w, channels))
        self._sq = np.zeros((w, channels))
        self._entropy = np.zeros(w)
        self._pred = np.zeros(w, dtype=np.int64)

    def _same_model(self, channels: int, classes: int, what: str) -> None:
        if self._channels is None:
            self._start(channels, classes)
        if (channels, classes) != (self._channels, self._classes):
            raise InputError(f"a {what} with {channels} channels and {classes} classes, after frames with "
                             f"{self._channels} and {self._classes}: one detector serves one model")

    def _summary(self) -> _Summary:
        assert self._classes is not None and self.full
        return _summarize(self._mean, self._sq, self._entropy, self._pred, self._classes)

    def _moves(self, now: _Summary) -> tuple[float, float, float]:
        ref = self._reference
        assert ref is not None
        per_channel = np.abs(now.mean - ref.mean) / ref.std + np.abs(np.log(now.std / ref.std))
        return float(per_channel.max()), abs(now.entropy - ref.entropy), abs(now.diversity - ref.diversity)


_WHAT = (("input statistics", " sigma"), ("serving entropy", ""), ("prediction diversity", ""))


class ShiftTrigger:
    """How the device loop acts on its ShiftDetector (docs/design.md): every served frame is observed; a
    detected shift is logged once and starts a round once `min_frames` frames of the new domain are in the
    buffer; then follow-up rounds on twice the frames each time, until the buffer is full of the new domain.
    Every round after a shift adapts on the frames since it only. `config` None: no detection (rounds on the
    cadence only), but the bookkeeping of the new domain's frames still works."""

    def __init__(self, config: ShiftConfig | None, min_frames: int, buffer: int,
                 log: Callable[[int, str, dict[str, Any]], None]) -> None:
        self.detector = ShiftDetector(config) if config is not None else None
        self.min_frames, self.buffer = min(min_frames, buffer), buffer
        self.log = log                   # (frame, reason, detector state) of each detected shift
        self.shift_at: int | None = None  # the frame a detected shift began at, until its round starts
        self.reason = ""
        self.domain_start = 0            # the frame the current domain began at (the last detected shift)
        self.followup: int | None = None  # new-domain frames at which the next follow-up round is due

    def observe(self, frame: int, image: np.ndarray, logits: np.ndarray) -> None:
        """One served frame (frame: frames served so far, this one included); also while a round runs."""
        det = self.detector
        if det is None:
            return
        det.update(image, logits)
        if det.full and not det.has_reference:
            det.set_reference()  # the first full window of this model's outputs
        if self.shift_at is not None:
            return
        reason = det.check()
        if reason is not None:
            self.shift_at, self.reason = max(0, frame - det.config.window), reason
            self.log(frame, reason, det.state())

    def swapped(self, reference: tuple[np.ndarray, np.ndarray] | None) -> None:
        """A new model serves: the reference is the held-back frames it was gated on, through it."""
        if self.detector is not None:
            self.detector.reset()
            if reference is not None:
                self.detector.set_reference_from(*reference)

    def due(self, frame: int) -> str | None:
        """The trigger of a round the shift asks for now ("shift: ..." or "follow-up: ..."), else None."""
        if self.shift_at is not None and frame - self.shift_at >= self.min_frames:
            self.domain_start = self.shift_at
            return f"shift: {self.reason}"
        new = frame - self.domain_start
        if self.followup is not None and new >= self.followup:
            return f"follow-up: {min(new, self.buffer)} frames since the shift"
        return None

    def new_frames(self, frame: int) -> int:
        """Frames of the current domain served so far (all of them before any shift)."""
        return frame - self.domain_start

    def started(self, trigger: str, frames: int) -> None:
        """A round started on `frames` frames: schedule the follow-up, and make the new domain the reference
        (the same shift does not fire again)."""
        self.followup = (2 * frames if trigger.startswith(("shift", "follow-up")) and frames < self.buffer
                         else None)
        self.shift_at = None
        if self.detector is not None and self.detector.full:
            self.detector.set_reference()
