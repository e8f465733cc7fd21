"""A labeled stream of built-in frames whose corruption changes over time (clean -> fog -> noise -> ...), in
a fixed temporal order, so the device loop's benefit and its recovery after each shift can be measured.
numpy only, so the runtime can use it without torch.

Spec: ``stream[:SEGMENTS][:key=value...]``

- SEGMENTS is ``default`` (the same as leaving it out) or a comma-separated list of ``DOMAIN[-SEVERITY]*FRAMES``:
  ``clean*1000``, ``fog-5*1000``, ``gaussian_noise-3*500``. DOMAIN is ``clean``, ``style`` or a corruption
  name; SEVERITY (1-5, default 5) is for corruptions only; FRAMES is a positive count up to
  MAX_SEGMENT_FRAMES. ``*`` and ``-`` are used because ``:`` separates the parts of a source spec (quote
  the spec in a shell, where ``*`` is a glob character).
- keys: ``seed=N`` (default 0) and ``split=train|val|calib|test`` (default test).

Example: ``stream:clean*500,fog-5*2000,clean*500:seed=3``.

Segment k (counting from 0) holds exactly
``load_domain(domain, severity, split, n=frames, seed=segment_seed(seed, k))``: every segment draws its
own glyphs, so no image repeats within a stream even when a domain comes back.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.source_base import Batch, ImageSource
from gprebn_edge.errors import InputError

__all__ = ["DEFAULT_SEGMENTS", "MAX_SEGMENT_FRAMES", "SegmentSpec", "StreamPlan", "Segment", "StreamBatch",
           "ShiftingStream", "parse_stream", "segment_seed", "open_stream"]

# clean, four severity-5 shifts, then clean again (recovery), 6000 frames in all.
DEFAULT_SEGMENTS = "clean*1000,fog-5*1000,gaussian_noise-5*1000,contrast-5*1000,shot_noise-5*1000,clean*1000"
# A segment is generated in one piece (~12 bytes per pixel of float32 temporaries while corrupting);
# a longer phase is several segments of the same domain.
MAX_SEGMENT_FRAMES = 20_000
_KEYS = ("seed", "split")
_NO_SEVERITY = ("clean", "style")
_FORM = "stream[:DOMAIN[-SEVERITY]*FRAMES,...][:seed=N][:split=SPLIT], e.g. stream:clean*1000,fog-5*1000"


@dataclass(frozen=True)
class SegmentSpec:
    domain: str
    severity: int | None  # None for clean and style
    frames: int

    @property
    def name(self) -> str:
        """'clean', 'fog-5': the token of the spec without the frame count."""
        return self.domain if self.severity is None else f"{self.domain}-{self.severity}"


@dataclass(frozen=True)
class StreamPlan:
    segments: tuple[SegmentSpec, ...]
    split: str = "test"
    seed: int = 0

    @property
    def total(self) -> int:
        return sum(s.frames for s in self.segments)

    @property
    def canonical(self) -> str:
        segs = ",".join(f"{s.name}*{s.frames}" for s in self.segments)
        return f"stream:{segs}:seed={self.seed}:split={self.split}"


class Segment(NamedTuple):
    """Frames [start, stop) of the stream come from one domain; name as in SegmentSpec.name."""

    name: str
    start: int
    stop: int


@dataclass
class StreamBatch(Batch):
    index: np.ndarray    # int64 (N,): each frame's position in the stream
    segment: np.ndarray  # int64 (N,): each frame's segment number, an index into ShiftingStream.segments()


def _parse_segment(token: str, spec: str) -> SegmentSpec:
    from gprebn_edge.data.corruptions import SEVERITIES
    from gprebn_edge.data.domains import DOMAINS

    head, star, count = token.partition("*")
    if not star or not count.isdecimal() or not head:
        raise InputError(f"bad segment {token!r} in {spec!r}: write DOMAIN[-SEVERITY]*FRAMES, as in fog-5*1000 "
                         f"(form: {_FORM})")
    domain, dash, sev = head.partition("-")
    if domain not in DOMAINS:
        raise InputError(f"unknown domain {domain!r} in segment {token!r} of {spec!r}: choose one of "
                         f"{', '.join(DOMAINS)}")
    severity: int | None = None
    if domain in _NO_SEVERITY:
        if dash:
            raise InputError(f"segment {token!r} of {spec!r}: {domain} takes no severity, write {domain}*{count}")
    elif not dash:
        severity = 5
    elif not sev.isdecimal() or int(sev) not in SEVERITIES:
        raise InputError(f"bad severity {sev!r} in segment {token!r} of {spec!r}: use one of "
                         f"{', '.join(map(str, SEVERITIES))}, as in {domain}-5*{count}")
    else:
        severity = int(sev)
    frames = int(count)
    if not 1 <= frames <= MAX_SEGMENT_FRAMES:
        raise InputError(f"segment {token!r} of {spec!r} has {frames} frames: use 1 to {MAX_SEGMENT_FRAMES} "
                         f"(split a longer phase into several segments)")
    return SegmentSpec(domain, severity, frames)


def parse_stream(spec: str) -> StreamPlan:
    """Parse and check a stream spec (see the module docstring); every error is a one-line InputError."""
    from gprebn_edge.data.synthetic import SPLITS

    if spec != "stream" and not spec.startswith("stream:"):
        raise InputError(f"not a stream spec: {spec!r} (form: {_FORM})")
    parts = spec.split(":")[1:]
    segs_text = parts[0] if parts and "=" not in parts[0] else "default"
    keys = parts[1:] if parts and "=" not in parts[0] else parts
    if segs_text.lower() == "default":
        segs_text = DEFAULT_SEGMENTS
    segments = tuple(_parse_segment(token, spec) for token in segs_text.split(","))
    out: dict = {"seed": 0, "split": "test"}
    given: set[str] = set()
    for part in keys:
        key, eq, value = part.partition("=")
        if not eq or key not in _KEYS or key in given:
            what = "repeated key" if key in given else "unknown key" if eq else "unexpected part"
            raise InputError(f"{what} {part!r} in {spec!r}: after the segments only seed=N and split=SPLIT may "
                             f"follow (form: {_FORM})")
        given.add(key)
        if key == "split":
            if value not in SPLITS:
                raise InputError(f"bad split {value!r} in {spec!r}: choose one of {', '.join(SPLITS)}")
            out["split"] = value
        elif not value.isdecimal():
            raise InputError(f"bad seed={value!r} in {spec!r}: the seed must be a non-negative integer")
        else:
            out["seed"] = int(value)
    return StreamPlan(segments, out["split"], out["seed"])


def segment_seed(seed: int, k: int) -> int:
    """The load_domain seed of segment k: distinct per (stream seed, position) and stable across runs."""
    return zlib.crc32(f"stream/{seed}/{k}".encode())


class ShiftingStream(ImageSource):
    """Built-in labeled frames in a fixed temporal order, one domain per segment; never shuffled. Each
    segment is generated when the iteration reaches it (about 0.3 s per 1000 frames)."""

    kind = "stream"

    def __init__(self, spec: str, preprocess: Preprocess, *, limit: int | None = None) -> None:
        self.plan = parse_stream(spec)
        self.canonical = self.plan.canonical
        super().__init__(spec, preprocess, self.plan.total, shuffle=False, seed=0, limit=limit)
        self.has_labels = True
        self.class_names = [str(d) for d in range(10)]
        self._bounds = np.cumsum([0] + [s.frames for s in self.plan.segments])

    def segments(self) -> list[Segment]:
        """(name, start, stop) of each segment, in stream order; clipped to the frames served (limit)."""
        n = len(self)
        return [Segment(s.name, int(a), int(min(b, n)))
                for s, a, b in zip(self.plan.segments, self._bounds[:-1], self._bounds[1:], strict=True) if a < n]

    def segment_of(self, index: int) -> int:
        """The segment number (index into segments()) of the frame at stream position `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} is outside the stream's {len(self)} frames")
        return int(np.searchsorted(self._bounds, index, side="right")) - 1

    def segment_ids(self, index: np.ndarray) -> np.ndarray:
        """segment_of over an array of stream positions, as int64."""
        index = np.asarray(index)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"frame positions must lie in [0, {len(self)}), got [{index.min()}, {index.max()}]")
        return np.searchsorted(self._bounds, index, side="right").astype(np.int64) - 1

    def segment_arrays(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Segment k's frames and labels as load_domain gives them: uint8 NHWC, int64; clipped to the limit."""
        from gprebn_edge.data.domains import load_domain

        seg = self.segments()[k]
        spec = self.plan.segments[k]
        images, labels = load_domain(spec.domain, severity=spec.severity or 5, split=self.plan.split,
                                     n=spec.frames, seed=segment_seed(self.plan.seed, k))
        keep = seg.stop - seg.start
        return images[:keep], labels[:keep]

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        raws: list[np.ndarray] = []
        labs: list[np.ndarray] = []
        pending = 0
        pos = 0  # stream position of the first pending frame
        for k in range(len(self.segments())):
            images, labels = self.segment_arrays(k)  # only this segment is held, besides load_domain's cache
            i = 0
            while i < len(images):
                take = min(batch_size - pending, len(images) - i)
                raws.append(images[i:i + take])
                labs.append(labels[i:i + take])
                pending += take
                i += take
                if pending == batch_size:
                    yield self._stream_batch(raws, labs, pos)
                    pos += pending
                    raws, labs, pending = [], [], 0
        if pending:
            yield self._stream_batch(raws, labs, pos)

    def _stream_batch(self, raws: list[np.ndarray], labs: list[np.ndarray], pos: int) -> StreamBatch:
        raw = self.preprocess.geometry_array(np.concatenate(raws) if len(raws) > 1 else raws[0])
        labels = np.concatenate(labs) if len(labs) > 1 else labs[0]
        index = np.arange(pos, pos + len(labels), dtype=np.int64)
        return StreamBatch(self.preprocess.normalize(raw), labels, raw, index, self.segment_ids(index))

    def describe(self) -> dict:
        return {**super().describe(), "canonical": self.canonical,
                "segments": [s._asdict() for s in self.segments()]}

    def _hash(self, update: Callable[[bytes], None]) -> None:
        update(f"{self.canonical}\0count={len(self)}".encode())


def open_stream(spec: str, preprocess: Preprocess, *, limit: int | None = None) -> ShiftingStream:
    """A ShiftingStream from 'stream[:SEGMENTS][:key=value...]' (what open_source will dispatch to)."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    return ShiftingStream(spec, preprocess, limit=limit)
