"""Atomic file writes: a crash at any point leaves either the previous file or the complete new one."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gprebn_edge.errors import GprebnError

__all__ = ["atomic_path", "write_text_atomic"]

_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_UMASK = os.umask(0o022)  # read once, at import (setting it is process-wide: not from a worker thread)
os.umask(_UMASK)


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
        return 0o666 & ~_UMASK


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
