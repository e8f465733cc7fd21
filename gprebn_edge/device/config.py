"""What `gprebn-edge loop` runs (LoopConfig, checked before any work) and what a run returns (LoopResult)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gprebn_edge.consent import CodeConsent
from gprebn_edge.device.gates import GateConfig
from gprebn_edge.device.shift import ShiftConfig
from gprebn_edge.errors import InputError

__all__ = ["LoopConfig", "LoopResult", "config_record"]


@dataclass
class LoopConfig:
    """What `gprebn-edge loop` runs. `model` None serves without adapting (a static baseline)."""

    state: Path
    source: str
    model: Path | None = None        # adapted checkpoint to keep adapting
    onnx: Path | None = None         # what serves at first (default: exported from `model`)
    engine: Path | None = None       # a refittable TensorRT engine to serve instead of the ONNX file
    every: int | None = 500          # frames between rounds
    interval: float | None = None    # or seconds between rounds
    buffer: int = 512
    holdout: float = 0.25            # newest fraction of a snapshot, held back from adaptation for the gates
    min_frames: int = 128            # no round before the buffer holds this many frames
    max_frames: int | None = None
    fps: float | None = None         # pace a file or built-in source like a camera (None: as fast as it serves)
    window: int = 250                # frames per metrics record
    probe: str | None = None         # labeled images for the probe-accuracy gate
    probe_limit: int = 256
    gates: GateConfig = field(default_factory=GateConfig)
    shift: ShiftConfig | None = field(default_factory=ShiftConfig)  # None: rounds on the cadence only
    recovery: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    momentum: float = 0.1
    adapt_threads: int = 1
    serve_threads: int | None = 1
    consent: CodeConsent | None = None  # to the model code the checkpoint names (user code needs it)
    verify: bool = True              # check --onnx/--engine (and the state's files) against their manifest hash

    def check(self) -> None:
        for name, flag in (("interval", "--interval"), ("fps", "--fps"), ("holdout", "--holdout"), ("lr", "--lr"),
                           ("momentum", "momentum")):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InputError(f"{flag} must be a finite number, got {value}")
        if self.lr <= 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if not 0 < self.momentum <= 1:
            raise InputError(f"momentum must be in (0, 1], got {self.momentum}")
        if self.adapt_threads < 1:
            raise InputError(f"--adapt-threads must be at least 1, got {self.adapt_threads}")
        if self.serve_threads is not None and self.serve_threads < 1:
            raise InputError(f"--serve-threads must be at least 1, got {self.serve_threads}")
        if self.min_frames < 1 or self.probe_limit < 1:
            raise InputError("min_frames and probe_limit must be at least 1")
        if (self.every is None) == (self.interval is None):
            raise InputError("give one of --every N (frames) and --interval S (seconds)")
        if self.every is not None and self.every < 1:
            raise InputError(f"--every must be at least 1 frame, got {self.every}")
        if self.interval is not None and self.interval <= 0:
            raise InputError(f"--interval must be positive, got {self.interval}")
        if self.buffer < 16:
            raise InputError(f"--buffer must hold at least 16 frames, got {self.buffer}")
        if not 0.05 <= self.holdout <= 0.5:
            raise InputError(f"--holdout must be in [0.05, 0.5], got {self.holdout}")
        if self.model is not None and self.buffer < self.min_frames:
            raise InputError(f"--buffer {self.buffer} holds fewer frames than a round needs ({self.min_frames}): "
                             f"give --buffer {self.min_frames} or more, or serve without --model")
        if self.window < 1 or self.recovery < 1 or self.batch_size < 1:
            raise InputError("--window, --recovery and --batch-size must be at least 1")
        if self.fps is not None and self.fps <= 0:
            raise InputError(f"--fps must be positive, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise InputError(f"--frames must be at least 1, got {self.max_frames}")
        if self.onnx is not None and self.engine is not None:
            raise InputError("give --onnx or --engine, not both")
        for name in ("model", "onnx", "engine"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise InputError(f"--{name} {path}: no such file")


@dataclass
class LoopResult:
    frames: int
    rounds: int
    passed: int
    swaps: int
    rollbacks: int
    served_round: int
    resumed: bool
    seconds: float
    stop_reason: str
    log: Path
    skipped: int = 0                 # unreadable frames skipped (image folders)
    errors: list[str] = field(default_factory=list)  # worker failures, each reported when it happened
    worker_abandoned: bool = False   # the worker did not stop in time and still runs (exit with os._exit)


def config_record(c: LoopConfig) -> dict[str, Any]:
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in c.__dict__.items()
           if k not in ("gates", "consent", "shift")}
    out["gates"] = c.gates.__dict__
    out["shift"] = None if c.shift is None else asdict(c.shift)
    out["consent"] = None if c.consent is None else asdict(c.consent)
    return out
