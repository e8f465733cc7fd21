"""The device loop's JSON-lines metrics log, written and read: append-only, flushed and fsynced per record,
bounded by size-based rotation (torch-free).

When `metrics.jsonl` would pass `max_bytes`, it becomes `metrics.1.jsonl` (an older `.1` becomes `.2`, and
so on; the `keep`-th is dropped), and the new file starts with a "log_continued" record whose "part" counts
the files before it since the log began. Every step is a rename within the folder: a kill leaves every
record in some part. The reader takes the parts oldest first; when the oldest it finds starts with
"log_continued", older parts were dropped and it says how many.

A kill can leave a part's last line cut short: that line is skipped and counted. So is a cut line directly
followed by a "start" record (the run was killed, then resumed). Any other unparsable line is corruption,
reported with its file and line number."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from gprebn_edge.errors import ArtifactError, InputError
from gprebn_edge.io import finite_json, strict_json

__all__ = ["MetricsLog", "LoopLog", "read_log", "log_parts", "rotated_path", "MAX_BYTES", "KEEP"]

MAX_BYTES = 8 << 20
KEEP = 2


def rotated_path(path: Path, k: int) -> Path:
    """metrics.jsonl -> metrics.<k>.jsonl (k >= 1; larger is older)."""
    return path.with_name(f"{path.stem}.{k}{path.suffix}")


def log_parts(path: str | Path) -> list[Path]:
    """The log's files, oldest first: metrics.<k>.jsonl by decreasing k, then `path` itself if it exists."""
    path = Path(path)
    pattern = re.compile(rf"^{re.escape(path.stem)}\.(\d+){re.escape(path.suffix)}$")
    older = sorted(((int(m[1]), p) for p in (path.parent.iterdir() if path.parent.is_dir() else ())
                    if (m := pattern.match(p.name)) and p.is_file()), reverse=True)
    return [p for _, p in older] + ([path] if path.is_file() else [])


class MetricsLog:
    """Append-only JSON lines, flushed (and fsynced, by default) per record: a kill loses at most the line being written
    (the reader skips a truncated last line). Rotated by size (see the module). Safe to share between the
    serving thread and the worker."""

    def __init__(self, path: str | Path, on_error: Callable[[OSError], None] | None = None,
                 max_bytes: int = MAX_BYTES, keep: int = KEEP, fsync: bool = True) -> None:
        if max_bytes < 1 or keep < 0:
            raise ValueError(f"max_bytes must be >= 1 and keep >= 0, got {max_bytes} and {keep}")
        self.path = Path(path)
        self.on_error = on_error     # a failed write (a full disk) is reported here; the record is dropped
        self.max_bytes, self.keep = max_bytes, keep
        self.fsync = fsync           # False: flushed per record only (per-frame predictions)
        self._lock = threading.Lock()
        self._part = _part_of(self.path)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._size, self._header = self.path.stat().st_size, 0  # header: the bytes a rotation starts a file with
        if self._size and not self._ends_with_newline():
            self._append("\n")  # a truncated last line from a kill: start on a fresh line
        elif not self._size and rotated_path(self.path, 1).is_file():  # killed between two renames
            self._part = _part_of(rotated_path(self.path, 1)) + 1
            self._append(self._continued_line())
            self._header = self._size

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _append(self, line: str) -> None:
        assert self._file is not None
        self._file.write(line)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self._size += len(line.encode("utf-8"))

    def _continued_line(self) -> str:
        return strict_json({"event": "log_continued", "t": round(time.time(), 3), "part": self._part}) + "\n"

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "t": round(time.time(), 3), **fields}
        line = strict_json(record, default=_jsonable) + "\n"
        with self._lock:
            if self._file is None:  # closed at stop: a worker still finishing after Ctrl-C is not an error
                return record
            try:
                if self._size > self._header and self._size + len(line.encode("utf-8")) > self.max_bytes:
                    self._rotate()
                self._append(line)
                return record
            except OSError as e:
                error = e
        if self.on_error is not None:  # outside the lock: the handler may log its own line
            self.on_error(error)
        return record

    def _rotate(self) -> None:
        """The new file is written aside first, so a failure before the renames changes nothing."""
        assert self._file is not None
        self._part += 1
        tmp = self.path.with_name(f".{self.path.name}.rotate.tmp")  # a stray one is cleaned like other .tmp
        try:
            new = open(tmp, "w", encoding="utf-8")  # noqa: SIM115 - becomes self._file
        except OSError:
            self._part -= 1
            raise
        try:
            head = self._continued_line()
            new.write(head)
            new.flush()
            os.fsync(new.fileno())
            for k in range(self.keep - 1, 0, -1):
                if rotated_path(self.path, k).exists():
                    os.replace(rotated_path(self.path, k), rotated_path(self.path, k + 1))
            if self.keep:
                os.replace(self.path, rotated_path(self.path, 1))
            os.replace(tmp, self.path)
        except BaseException:
            new.close()
            tmp.unlink(missing_ok=True)
            self._part -= 1
            raise
        _fsync_dir(self.path.parent)
        self._file.close()
        self._file = new
        self._size = self._header = len(head.encode("utf-8"))

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _part_of(path: Path) -> int:
    """The "part" of a file's leading "log_continued" record, 0 when it has none."""
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.readline())
        part = rec.get("part") if isinstance(rec, dict) and rec.get("event") == "log_continued" else 0
        return part if isinstance(part, int) and part >= 0 else 0
    except (OSError, ValueError):
        return 0


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform opens folders
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays in log records."""
    if hasattr(value, "tolist"):
        return finite_json(value.tolist())
    raise TypeError(f"cannot log {type(value).__name__}")


# ---- reading ----

# fields every known event must carry (besides "event" and "t"), checked when the log is read
_REQUIRED = {
    "start": ("round", "frames"),
    "window": ("frames", "n", "served_round"),
    "round": ("round", "frames", "passed"),
    "swap": ("round", "frames"),
    "rollback": ("to_round", "frames"),
    "fallback": ("from_round", "to_round", "frames"),
    "fallback_check": ("round", "frames", "passed"),
    "stop": ("frames",),
    "publish": ("round",),
    "log_continued": ("part",),
}


@dataclass(frozen=True)
class LoopLog:
    """The parsed records in order (the parts oldest first), where each one is ("file line N"), the lines
    skipped as cut short by a kill, the parts read, and how many older parts rotation dropped."""

    path: Path
    records: list[dict[str, Any]]
    where: list[str]
    truncated_lines: tuple[str, ...] = ()
    parts: tuple[Path, ...] = ()
    dropped_parts: int = 0

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["event"] == name]


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_record(rec: Any, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict) or not isinstance(rec.get("event"), str):
        raise ArtifactError(f"{where}: not a loop record (a JSON object with an \"event\" name)")
    if not _is_number(rec.get("t")):
        raise ArtifactError(f"{where}: the {rec['event']!r} record has no numeric time \"t\"")
    for key in _REQUIRED.get(rec["event"], ()):
        ok = isinstance(rec.get(key), bool) if key == "passed" else _is_number(rec.get(key))
        if not ok:
            raise ArtifactError(f"{where}: the {rec['event']!r} record lacks a valid {key!r}")
    segments = rec.get("by_segment") or {}
    if not isinstance(segments, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(_is_number(c) for c in v) for v in segments.values()):
        raise ArtifactError(f"{where}: \"by_segment\" must map segment names to [correct, labeled]")
    return rec


def _read_part(path: Path) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(records, where each is, cut lines skipped) of one file."""
    raw = [(i + 1, line) for i, line in enumerate(path.read_bytes().split(b"\n")) if line.strip()]
    parsed: list[tuple[int, Any]] = []  # (line, record or None when unparsable)
    for number, line in raw:
        try:
            parsed.append((number, json.loads(line.decode("utf-8"))))
        except (UnicodeDecodeError, json.JSONDecodeError):
            parsed.append((number, None))
    records, where, truncated = [], [], []
    for k, (number, rec) in enumerate(parsed):
        if rec is None:
            nxt = parsed[k + 1][1] if k + 1 < len(parsed) else None
            if k + 1 == len(parsed) or (isinstance(nxt, dict) and nxt.get("event") == "start"):
                truncated.append(f"{path} line {number}")  # cut by a kill (then possibly resumed)
                continue
            glued = raw[k][1].count(b'"event"') > 1
            raise ArtifactError(f"{path} line {number}: unparsable JSON in the middle of the log"
                                + (" (a record appended to a line cut by a kill?)" if glued else "")
                                + ": the log is corrupt")
        records.append(_check_record(rec, f"{path} line {number}"))
        where.append(f"{path} line {number}")
    return records, where, truncated


def read_log(path: str | Path) -> LoopLog:
    """Parse a metrics log with its rotated parts. Missing or empty -> InputError; a corrupt line ->
    ArtifactError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"metrics log {path} does not exist (or is not a file): give the LOG that "
                         f"`gprebn-edge loop` wrote")
    parts = log_parts(path)
    records: list[dict[str, Any]] = []
    where: list[str] = []
    truncated: list[str] = []
    for part in parts:
        r, w, t = _read_part(part)
        records += r
        where += w
        truncated += t
    if not records:
        raise InputError(f"metrics log {path} is empty: the loop wrote no record" if not truncated else
                         f"metrics log {path} has no complete record (only a line cut short)")
    first = records[0]
    dropped = int(first["part"]) if first["event"] == "log_continued" else 0
    return LoopLog(path, records, where, tuple(truncated), tuple(parts), dropped)
