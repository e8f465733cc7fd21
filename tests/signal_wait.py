"""Shared by the signal tests (tests/test_signals.py, tests/device/test_loop_lifecycle.py): wait until a child
process has installed its SIGTERM handler, so that a signal tests the command's handling, not Python's start.
Plain module, no tests; found on the path pytest inserts for tests/conftest.py."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

__all__ = ["handles_sigterm", "wait_for_handlers"]


def handles_sigterm(pid: int) -> bool:
    """The process has installed its SIGTERM handler (Linux: the caught-signals mask in /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return False


def wait_for_handlers(child: subprocess.Popen, deadline: float) -> None:
    """Poll until `child` handles SIGTERM, exits, or time.monotonic() passes `deadline`."""
    while not handles_sigterm(child.pid) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
