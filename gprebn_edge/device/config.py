"""What `gprebn-edge loop` and `AdaptiveLoop` run (LoopConfig, checked when it is made, before any work)
and what a run returns (LoopResult)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gprebn_edge.consent import CodeConsent
from gprebn_edge.device.gates import GateConfig
from gprebn_edge.device.shift import ShiftConfig
from gprebn_edge.errors import InputError
from gprebn_edge.validate import flag_number

__all__ = ["LoopConfig", "LoopResult", "config_record", "DEFAULT_EVERY", "APP_SOURCE", "RUNNER_BATCH", "default"]

DEFAULT_EVERY = 500  # frames between rounds when neither `every` nor `interval` is given
APP_SOURCE = "app:"  # the source of an AdaptiveLoop: the application's own frames
# frames per call when the loop runs a model in onnxruntime beside serving (the start's and each candidate's
# parity check, the gates): its CPU arena keeps the largest batch's memory for good, ~11 MB per frame on
# EfficientNet-Lite0, and serving itself runs at 1 (benchmarks/results/loop_memory.md)
RUNNER_BATCH = 4
# the `loop` command's flag of each field it has (the others are named as fields: min_frames, batch_size, ...)
_FLAGS = {"every": "--every", "adapt_threads": "--adapt-threads", "serve_threads": "--serve-threads",
          "window": "--window", "recovery": "--recovery", "max_frames": "--frames", "keep": "--keep",
          "buffer": "--buffer", "max_memory": "--max-memory"}


@dataclass
class LoopConfig:
    """What the loop runs. `model` None serves without adapting (a static baseline). The flag names in the
    messages are the `loop` command's."""

    state: Path
    source: str                      # the CLI's frame source; AdaptiveLoop: APP_SOURCE (the application's frames)
    model: Path | None = None        # adapted checkpoint to keep adapting
    onnx: Path | None = None         # what serves at first (default: exported from `model`)
    engine: Path | None = None       # a refittable TensorRT engine to serve instead of the ONNX file
    every: int | None = None         # frames between rounds (DEFAULT_EVERY when `interval` is not given)
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
    batch_size: int = 64             # frames per adaptation step
    lr: float = 1e-3
    momentum: float = 0.1
    adapt_threads: int = 1
    serve_threads: int | None = 1
    consent: CodeConsent | None = None  # to the model code the checkpoint names (user code needs it)
    verify: bool = True              # check --onnx/--engine (and the state's files) against their manifest hash
    predictions: str | None = None   # "-" (stdout) or a file: one JSON line per served frame
    publish: str | None = None       # DIR[:NAME]: a Triton model repository that gets every gated model
    keep: int = 3                    # versions kept in the published repository
    max_memory: int | None = None    # bytes the process may peak at while a round runs (None: no limit)

    def __post_init__(self) -> None:
        if not isinstance(self.state, Path):
            raise InputError("LoopConfig.state must be a Path")
        for name, flag in (("interval", "--interval"), ("fps", "--fps"), ("holdout", "--holdout"), ("lr", "--lr"),
                           ("momentum", "momentum")):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InputError(f"{flag} must be a finite number, got {value}")
        if self.every is None and self.interval is None:
            self.every = DEFAULT_EVERY
        elif self.every is not None and self.interval is not None:
            raise InputError("give one of --every N (frames) and --interval S (seconds)")
        for name, low in (("every", 1), ("adapt_threads", 1), ("serve_threads", 1), ("window", 1), ("recovery", 1),
                          ("max_frames", 1), ("keep", 1), ("min_frames", 1), ("probe_limit", 1), ("batch_size", 1),
                          ("buffer", 16), ("max_memory", 1)):
            flag_number(getattr(self, name), _FLAGS.get(name, name), low=low)
        if self.lr <= 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if not 0 < self.momentum <= 1:
            raise InputError(f"momentum must be in (0, 1], got {self.momentum}")
        if self.interval is not None and self.interval <= 0:
            raise InputError(f"--interval must be positive, got {self.interval}")
        if not 0.05 <= self.holdout <= 0.5:
            raise InputError(f"--holdout must be in [0.05, 0.5], got {self.holdout}")
        if self.model is not None and self.buffer < self.min_frames:
            raise InputError(f"--buffer {self.buffer} holds fewer frames than a round needs ({self.min_frames}): "
                             f"give --buffer {self.min_frames} or more, or serve without --model")
        if self.fps is not None and self.fps <= 0:
            raise InputError(f"--fps must be positive, got {self.fps}")
        if self.onnx is not None and self.engine is not None:
            raise InputError("give --onnx or --engine, not both")
        if self.publish is not None and not self.publish.strip():
            raise InputError("--publish needs a folder: DIR or DIR:NAME")
        for name in ("model", "onnx", "engine"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise InputError(f"--{name} {path}: no such file")


def default(name: str) -> Any:
    """LoopConfig's default for field `name` (the CLI's option defaults come from here)."""
    f = LoopConfig.__dataclass_fields__[name]
    return f.default_factory() if callable(f.default_factory) else f.default


@dataclass
class LoopResult:
    frames: int
    rounds: int
    passed: int
    swaps: int
    rollbacks: int
    fallbacks: int
    served_round: int
    resumed: bool
    seconds: float
    stop_reason: str
    log: Path
    skipped: int = 0                 # unreadable frames skipped (image folders)
    errors: list[str] = field(default_factory=list)  # worker failures, each reported when it happened
    worker_abandoned: bool = False   # the worker did not stop in time and still runs (exit with os._exit)
    peak_rss: int | None = None      # bytes: the process's peak resident memory (ru_maxrss), serving and rounds


def config_record(c: LoopConfig) -> dict[str, Any]:
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in c.__dict__.items()
           if k not in ("gates", "consent", "shift")}
    out["gates"] = c.gates.__dict__
    out["shift"] = None if c.shift is None else asdict(c.shift)
    out["consent"] = None if c.consent is None else asdict(c.consent)
    return out
