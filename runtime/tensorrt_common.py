"""What the TensorRT builder (gprebn_edge.export.tensorrt_build) and runner (trt_runner) share: the one
process-wide TensorRT logger, the collection of its error messages per build or run, and the map from
TensorRT data types to numpy.

Why one logger: TensorRT's own documentation (7.x-8.0) says that although each Builder and Runtime takes a
logger, "the logger is internally considered a singleton", so all must use the same one; 8.2+ and 10.x say
the logger given to a Builder, Runtime or Refitter serves every object made through it, must outlive them and
must be thread-safe. With one logger per runner, a second logger's messages can go to the first. So there is
one, made on first use, and callers that want "the errors of this call" open `capture_errors()`.

Imports without tensorrt; `trt_logger()` imports it."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from gprebn_edge.optional import import_tensorrt

if TYPE_CHECKING:  # checked against TensorRT's stubs where installed (scripts/fix_trt_stubs.py)
    import tensorrt as trt

__all__ = ["ErrorLog", "NUMPY_DTYPES", "capture_errors", "dims", "numpy_dtype", "trt_logger"]

# TensorRT DataType names -> numpy dtype names; None: a type numpy lacks (BF16, FP8, ...), never engine I/O here
NUMPY_DTYPES: dict[str, str | None] = {"FLOAT": "float32", "HALF": "float16", "BF16": None, "INT8": "int8",
                                       "UINT8": "uint8", "INT32": "int32", "INT64": "int64", "BOOL": "bool"}

_log = logging.getLogger("gprebn_edge.tensorrt")
_log.addHandler(logging.NullHandler())  # TensorRT's warnings reach logging, not stderr, unless configured


def numpy_dtype(name: str) -> np.dtype | None:
    """The numpy dtype of a TensorRT DataType name ("FLOAT" -> float32), or None where numpy has none."""
    found = NUMPY_DTYPES.get(name)
    return np.dtype(found) if found is not None else None


def dims(value: trt.Dims) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple of ints (-1 for a dynamic dimension)."""
    return tuple(int(value[i]) for i in range(len(value)))


class ErrorLog:
    """TensorRT error messages, each on one line; bounded and thread-safe."""

    def __init__(self, keep: int = 50) -> None:
        self._lines: deque[tuple[int, str]] = deque(maxlen=keep)
        self._count = 0
        self._lock = threading.Lock()

    def add(self, message: str) -> None:
        with self._lock:
            self._lines.append((self._count, " ".join(message.split())))
            self._count += 1

    def mark(self) -> int:
        """A position; `since(mark)` returns what was logged after it."""
        with self._lock:
            return self._count

    def since(self, mark: int = 0, last: int = 3) -> str:
        """The last `last` messages after `mark`, joined by "; " (or a note that there were none)."""
        with self._lock:
            lines = [m for i, m in self._lines if i >= mark][-last:]
        return "; ".join(lines) if lines else "no error message from TensorRT"

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._lines)


class _Captures:
    """The ErrorLogs open in `capture_errors()`, by thread: TensorRT calls the logger on the thread that
    called into it, so a message goes to that thread's innermost capture. One logged on a thread with none
    open (a TensorRT worker thread) goes to every open capture: better twice than lost."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_thread: dict[int, list[ErrorLog]] = {}

    def push(self, log: ErrorLog) -> None:
        with self._lock:
            self._by_thread.setdefault(threading.get_ident(), []).append(log)

    def pop(self, log: ErrorLog) -> None:
        with self._lock:
            stack = self._by_thread.get(threading.get_ident(), [])
            if log in stack:
                stack.remove(log)
            if not stack:
                self._by_thread.pop(threading.get_ident(), None)

    def deliver(self, message: str) -> None:
        with self._lock:
            mine = self._by_thread.get(threading.get_ident())
            targets = mine[-1:] if mine else [log for stack in self._by_thread.values() for log in stack]
        for log in targets:
            log.add(message)


_CAPTURES = _Captures()


@contextlib.contextmanager
def capture_errors(keep: int = 50) -> Iterator[ErrorLog]:
    """Collect the TensorRT errors logged (on this thread) inside the block: `with capture_errors() as
    errors: ...; raise GprebnError(f"...: {errors.since()}")`. Nests; the innermost capture gets them."""
    log = ErrorLog(keep)
    _CAPTURES.push(log)
    try:
        yield log
    finally:
        _CAPTURES.pop(log)


def _record(severity_name: str, msg: str) -> None:
    """What the logger does with one message (apart from TensorRT, so it is testable without it)."""
    if severity_name in ("INTERNAL_ERROR", "ERROR"):
        _CAPTURES.deliver(msg)
        _log.error("TensorRT: %s", msg)
    elif severity_name == "WARNING":
        _log.warning("TensorRT: %s", msg)
    else:
        _log.debug("TensorRT: %s", msg)


@functools.cache  # one per process (see the module docstring); it must outlive every object made with it
def trt_logger() -> trt.ILogger:
    """The process's TensorRT logger: errors go to the open `capture_errors()`; everything to `logging`."""
    import_tensorrt()
    import tensorrt as trt

    class RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # the trampoline needs the explicit base __init__

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            _record(severity.name, msg)

    return RecordingLogger()
