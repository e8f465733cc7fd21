"""What the device loop keeps on disk in its --state folder, so that a kill at any moment leaves a servable
state and a restart resumes (torch-free).

    state.json                     which round serves, where its files are, frames served, failure count
    round-NNNNNN.safetensors       the round's adapted checkpoint (the model adaptation continues from)
    round-NNNNNN.onnx (+ .manifest.json, + .engine where TensorRT serves)
    metrics.jsonl                  the JSON-lines metrics log, appended (rotated: metrics_log.py)

Order of writes for a new round: its checkpoint, ONNX (and engine) are written atomically first, then
state.json is replaced atomically to point at them, and only then are the previous round's files removed.
A kill before the state.json rename leaves the previous state (the new files are strays, removed on the
next start); after it, the new round is complete. A round's files are written only after it passed its
gates, so state.json never points at a candidate that failed. Round 0 (the start: the model the loop was
given) is always kept, so that the loop can fall back to it (worker.py)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gprebn_edge.errors import ArtifactError, GprebnError
from gprebn_edge.io import strict_json, write_text_atomic
from gprebn_edge.runtime.loading import manifest_beside
from gprebn_edge.validate import number, optional, require

_START_AFRESH = "move the folder away to start afresh"

__all__ = ["LoopState", "StateDir", "STATE_VERSION"]

STATE_VERSION = 1
_ROUND_FILE = re.compile(r"^round-(\d{6})\.(safetensors|onnx|engine|manifest\.json)$")


@dataclass
class LoopState:
    """The small state file: the serving round and its files (names relative to the state folder)."""

    round: int
    checkpoint: str
    onnx: str
    engine: str | None = None
    frames: int = 0                 # frames served so far (a restart skips them in a finite source)
    failures: int = 0               # consecutive failed candidates
    rounds_tried: int = 0           # candidate ids handed out so far (ids are never reused)
    source: str | None = None
    updated: float = field(default_factory=time.time)
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StateDir:
    """The --state folder: read and write state.json, name and clean up round files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise GprebnError(f"--state {self.path} is a file: give a folder (it is created if missing)")

    def create(self) -> None:
        """Make the folder (only once the loop's inputs have been checked: a failed start leaves nothing)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GprebnError(f"cannot create --state {self.path}: {e.strerror or e}") from None

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def log_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def round_path(self, round_id: int, suffix: str) -> Path:
        return self.path / f"round-{round_id:06d}{suffix}"

    def start_state(self) -> LoopState | None:
        """Round 0, the model the loop started from, as a state that serves it; None when its checkpoint or
        its ONNX file is gone (a folder cleaned by an older version, or a loop started without --model)."""
        checkpoint, onnx, engine = (self.round_path(0, s) for s in (".safetensors", ".onnx", ".engine"))
        if not (checkpoint.is_file() and onnx.is_file()):
            return None
        return LoopState(round=0, checkpoint=checkpoint.name, onnx=onnx.name,
                         engine=engine.name if engine.is_file() else None)

    def read(self) -> LoopState | None:
        """The saved state, None when there is none; ArtifactError when it is unreadable or its files are gone."""
        if not self.state_file.exists():
            return None
        try:
            raw = json.loads(self.state_file.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "not JSON" if isinstance(
                e, ValueError) else str(e)
            raise ArtifactError(f"cannot read {self.state_file} ({reason}): move the folder away to start "
                                "afresh") from None
        state = self._validate(raw)
        if state.version != STATE_VERSION:
            raise ArtifactError(f"{self.state_file} is version {state.version}, this gprebn-edge reads version "
                                f"{STATE_VERSION}: use a new --state folder")
        for name in (state.checkpoint, state.onnx, state.engine):
            if name and not (self.path / name).is_file():  # "" : no checkpoint (a loop that only serves)
                raise ArtifactError(f"{self.state_file} names {name}, which is missing: move the folder away to "
                                    "start afresh")
        return state

    def _validate(self, raw: Any) -> LoopState:
        """Types, ranges, and file names that stay inside the state folder (validate.py); one line naming
        the field."""
        where, fix = self.state_file, _START_AFRESH
        if not isinstance(raw, dict):
            raise ArtifactError(f"{where}: expected a JSON object, got {type(raw).__name__}: {fix}")
        for key in ("round", "frames", "failures", "rounds_tried", "version"):
            if key in ("round",) or key in raw:
                number(raw, key, where, integer=True, low=0, fix=fix)
        if "updated" in raw:
            number(raw, "updated", where, fix=fix)
        for key in ("checkpoint", "onnx"):
            require(raw, key, str, where, fix=fix)
        for key in ("engine", "source"):
            optional(raw, key, str, where, fix=fix)
        root = self.path.resolve()
        for key in ("checkpoint", "onnx", "engine"):
            name = raw.get(key)
            if name and (Path(name).name != name or (self.path / name).resolve().parent != root):
                raise ArtifactError(f"{where}: its field '{key}' names {name!r:.80}, which is not a file inside the "
                                    f"state folder: {fix}")
        return LoopState(**{k: v for k, v in raw.items() if k in LoopState.__dataclass_fields__})

    def write(self, state: LoopState) -> None:
        state.updated = time.time()
        write_text_atomic(self.state_file, strict_json(state.to_dict(), indent=1) + "\n")

    def clean(self, state: LoopState | None) -> list[str]:
        """Remove round files that neither `state` nor the start (round 0) references and leftover temporary
        files; return their names."""
        if not self.path.is_dir():
            return []
        keep = set()
        for kept in (state, self.start_state()):
            if kept is not None:
                keep |= {kept.checkpoint, kept.onnx, kept.engine,
                         *(manifest_beside(f).name for f in (kept.onnx, kept.engine) if f)}
        removed = []
        for f in self.path.iterdir():
            stray_tmp = f.name.startswith(".") and f.name.endswith(".tmp")
            if (stray_tmp or (_ROUND_FILE.match(f.name) and f.name not in keep)) and f.is_file():
                f.unlink(missing_ok=True)
                removed.append(f.name)
        return sorted(removed)
