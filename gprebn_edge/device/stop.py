"""The one stop request the device loop and its worker share (torch-free).

Whoever wants the loop to stop (a CLI signal handler, a library caller's Ctrl-C, `AdaptiveLoop.close`, the
loop itself at its frame limit) calls `request(reason)`. The serving side reads it between two frames and
between start-up steps; the worker between two adaptation steps, where it raises `Stopped` and drops its
round. Nothing is ever raised into native code or into an import another thread waits on."""

from __future__ import annotations

import threading

__all__ = ["StopToken", "Stopped", "INTERRUPTED"]

INTERRUPTED = "interrupted"  # the reason of a stop asked for from outside (Ctrl-C, SIGTERM, a caller)


class Stopped(Exception):
    """Raised inside the worker between a round's steps once a stop was requested: the round is dropped."""


class StopToken:
    """A stop request, once set never cleared; the first reason wins."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None

    def request(self, reason: str = INTERRUPTED) -> None:
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def interrupted(self) -> bool:
        """Stopped from outside (Ctrl-C, SIGTERM, a caller), not by the loop's own end."""
        return self.reason == INTERRUPTED

    def check(self) -> None:
        """Raise Stopped once a stop was requested (the worker's safe points)."""
        if self._event.is_set():
            raise Stopped
