"""Atomic file writes: a crash at any point leaves either the previous file or the complete new one. Strict
JSON: what the tool writes parses anywhere (no NaN or Infinity, which JSON does not have)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gprebn_edge.errors import GprebnError

__all__ = ["atomic_path", "write_text_atomic", "finite_json", "strict_json", "current_umask", "sha256_file"]

_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_PROC_STATUS = "/proc/self/status"
_fallback_lock = threading.Lock()
_fallback_umask: int | None = None


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: `Umask:` in /proc/self/status,
    read afresh each time). Elsewhere it can only be read by setting it and putting it back, which is
    process-wide: that is done once, at first use and under a lock, and the value kept."""
    global _fallback_umask
    try:
        with open(_PROC_STATUS, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _fallback_lock:
        if _fallback_umask is None:
            _fallback_umask = os.umask(0o022)
            os.umask(_fallback_umask)
        return _fallback_umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`, on any
    error (KeyboardInterrupt included) it is removed and `path` is left as it was."""
    path = Path(path)
    if path.is_dir():
        raise GprebnError(f"{path} is a directory: give a file name for the output")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise GprebnError(f"output folder {parent} does not exist: create it first")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise GprebnError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))  # mkstemp makes 0600 files; the output gets an ordinary file's mode
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in _WRITE_ERRNOS:  # a full or read-only disk is the user's to fix, not a bug
            raise GprebnError(f"cannot write {path}: {e.strerror or e}; {path.name} was left as it was") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """The replaced file's own mode, or the one `open()` would give a new file (0666 less the umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~current_umask()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def finite_json(value: Any) -> Any:
    """`value` with every NaN and infinity replaced by None (null); dicts, lists and tuples are walked."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """json.dumps of `value` as strict JSON: non-finite numbers become null (a `default` hook's results too)."""
    default = kwargs.pop("default", None)
    hook = None if default is None else (lambda v: finite_json(default(v)))
    return json.dumps(finite_json(value), allow_nan=False, default=hook, **kwargs)


def sha256_file(path: str | Path) -> str:
    """`sha256:<hex>` of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"
