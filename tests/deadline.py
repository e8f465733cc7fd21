"""Shared by the tests that run the device loop: call a function in a thread with a deadline, so that a hang
fails the test instead of blocking the run. Plain module, no tests; found on the path pytest inserts for
tests/conftest.py."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["call_with_deadline"]

T = TypeVar("T")


def call_with_deadline(fn: Callable[[], T], timeout: float, what: str = "the call") -> T:
    """fn() in a daemon thread; its exception is raised here; AssertionError after `timeout` seconds."""
    out: dict[str, object] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{what} did not return within {timeout} s (a hang)"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["result"]  # type: ignore[return-value]
