"""Progress that a log shows: one plain line every few seconds (what, images done, rate, ETA) on stderr.

A rich bar draws only on a terminal and leaves nothing in a redirected log; long work (adapt, export's parity
check, the long benchmarks) reports through `ProgressLine` instead, which writes the same line whether
stderr is a terminal or a file:

    adapting (gprebn): 192/389 images, 21.3 images/s, ETA 9 s

Nothing is printed for work that ends within the first interval, so quick commands and tests stay quiet.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["ProgressLine", "progress_lines", "format_seconds", "DEFAULT_EVERY"]

DEFAULT_EVERY = 5.0


def format_seconds(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressLine:
    """Reports `done` of `total` (None: unknown) items of one piece of work, at most once per `every` seconds.

    `update(done)` is cheap between reports (one clock read). `close()` prints a final line when at least
    one line was printed before, so a log always shows how the work ended."""

    def __init__(self, what: str, total: int | None = None, *, unit: str = "images", every: float = DEFAULT_EVERY,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.every = every
        self.stream = stream
        self.clock = clock
        self.start = clock()
        self.last = self.start
        self.done = 0
        self.lines = 0

    def line(self, final: bool = False) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        text = f"{self.what}: {count} {self.unit}, {rate:.1f} {self.unit}/s"
        if final:
            return f"{text}, done in {format_seconds(elapsed)}"
        if self.total and rate > 0:
            text += f", ETA {format_seconds(max(self.total - self.done, 0) / rate)}"
        return text

    def _print(self, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr  # looked up late: tests swap stderr
        print(text, file=stream, flush=True)
        self.lines += 1

    def update(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            if self.total and done >= self.total:  # finished: close() says so, once
                self.lines = max(self.lines, 1)
                return
            self._print(self.line())

    def close(self) -> None:
        if self.lines:
            self._print(self.line(final=True))

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()


def progress_lines(every: float = DEFAULT_EVERY, stream: TextIO | None = None
                   ) -> Callable[[str, int, int | None], None]:
    """A `report(what, done, total)` callback for work done in stages: one ProgressLine per stage, a new one
    whenever `what` changes (the previous stage's final line is printed then)."""
    current: list[ProgressLine] = []

    def report(what: str, done: int, total: int | None) -> None:
        if not current or current[0].what != what:
            if current:
                current[0].close()
            current[:] = [ProgressLine(what, total, every=every, stream=stream)]
        current[0].update(done, total)
        if total is not None and done >= total:
            current[0].close()
            current[0].lines = 0  # closed: a repeated final update prints nothing more

    return report
