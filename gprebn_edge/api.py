"""gprebn-edge's public Python API (docs/api.md), re-exported lazily by `gprebn_edge`: adapt, export, open a
runner, compare, and `AdaptiveLoop`, the device loop that an application feeds its own frames.

Each function calls the library function its command calls (the CLI is a shell over the same code) and
returns what that command's `--json` writes. Importing this module imports neither torch nor onnxruntime:
`open_runner`, `compare` and `AdaptiveLoop` without `model=` run on a serving box without PyTorch."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from gprebn_edge.budget import parse_size
from gprebn_edge.consent import CodeConsent
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.device.config import APP_SOURCE, LoopConfig, LoopResult
from gprebn_edge.device.session import LoopSession, LoopStatus
from gprebn_edge.device.shift import ShiftConfig
from gprebn_edge.device.window import frame_predictions
from gprebn_edge.errors import GprebnError, InputError
from gprebn_edge.runtime.base import Runner
from gprebn_edge.runtime.compare import CompareResult
from gprebn_edge.stages import CHECKPOINTS, fold_as_exported

__all__ = ["adapt", "export_onnx", "open_runner", "compare", "AdaptiveLoop", "AdaptReport", "ExportReport",
           "Predictions", "LoopStatus", "LoopResult", "CompareResult", "GprebnError"]


def _given(**kw: Any) -> dict[str, Any]:
    """The keyword arguments a caller gave (None: the library's own default)."""
    return {k: v for k, v in kw.items() if v is not None}


@dataclass(frozen=True)
class AdaptReport:
    """What `adapt` wrote and measured: `to_dict()` is what `gprebn-edge adapt --json` writes."""

    output: Path
    summary: dict[str, Any]   # method, images, entropy before/after, the health check's verdict and signals

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), **self.summary}


def adapt(model: str, data: str, output: str | Path, *, weights: str | None = None, num_classes: int | None = None,
          method: str | None = None, batch_size: int | None = None, lr: float | None = None,
          holdout: float | None = None, seed: int | None = None, preprocess: dict[str, Any] | None = None,
          shuffle: bool = True, limit: int | None = None, force: bool = False) -> AdaptReport:
    """Adapt `model` (builtin:NAME, torchvision:NAME, file.py:factory, module:factory) to the unlabeled images
    `data` and write the adapted checkpoint `output` (.safetensors), as `gprebn-edge adapt` does. Arguments
    left None take the command's defaults. A collapsed model is not written unless `force`; a non-finite one
    never (GprebnError). Needs PyTorch."""
    from gprebn_edge.adaptation import AdaptConfig, adapt_to_file

    config = AdaptConfig(**_given(method=method, batch_size=batch_size, lr=lr, holdout=holdout, seed=seed))
    result = adapt_to_file(model, data, output, config, weights=weights, num_classes=num_classes,
                           preprocess=preprocess, shuffle=shuffle, limit=limit, force=force)
    return AdaptReport(Path(output), result.summary)


@dataclass(frozen=True)
class ExportReport:
    """The exported ONNX file and its manifest: `to_dict()` is what `gprebn-edge export --json` writes."""

    onnx: Path
    manifest: dict[str, Any]  # hashes, opset, input/output, preprocessing, parity, where each BN was folded

    def to_dict(self) -> dict[str, Any]:
        return dict(self.manifest)


def export_onnx(artifact: str | Path, onnx: str | Path | None = None, *, unadapted: bool = False,
                data: str | None = None, check_images: int | None = None, model_code: str | None = None,
                trust_model_code: bool = False) -> ExportReport:
    """Fold the checkpoint's BatchNorms and export ONNX, written only after onnxruntime matched PyTorch on
    real images, as `gprebn-edge export` does (default path: beside the artifact). Model code the artifact
    names runs only with consent: `model_code` naming exactly that code, or `trust_model_code`. Needs PyTorch."""
    from gprebn_edge.export.pipeline import export_artifact

    consent = CodeConsent(spec=model_code, any_code=trust_model_code, flag="model_code")
    manifest = export_artifact(artifact, onnx, unadapted=unadapted, data=data, consent=consent,
                               **_given(check_images=check_images))
    return ExportReport(Path(manifest["onnx"]), manifest)


def open_runner(path: str | Path, backend: str = "auto", **options: Any) -> Runner:
    """A (not yet activated) runner for an ONNX file, engine or checkpoint: runtime.loading.open_runner, with
    its keyword options, reading checkpoints with the adapt stage's reader."""
    from gprebn_edge.runtime.loading import open_runner as open_model

    options.setdefault("checkpoints", CHECKPOINTS)
    return open_model(path, backend, **options)


def compare(model_a: str | Path, model_b: str | Path, data: str, *, batch: int | None = None,
            limit: int | None = None, latency_iters: int | None = None, backend_a: str = "auto",
            backend_b: str = "auto", device: str | None = None, threads: int | None = None,
            trust_model_code: bool = False, verify: bool = True) -> CompareResult:
    """Two models (ONNX files, engines or checkpoints) on the same images, as `gprebn-edge compare` does:
    accuracy (with labels), agreement, entropy, confidence, calibration error and interleaved latency.
    `result.to_dict()` is what `compare --json` writes; `result.to_markdown()` its table."""
    from gprebn_edge.runtime.tasks import RunnerOptions, compare_models

    consent = CodeConsent(any_code=trust_model_code)
    a, b = (RunnerOptions(backend=backend, device=device, threads=threads, consent=consent, verify=verify,
                          prepare=fold_as_exported, checkpoints=CHECKPOINTS) for backend in (backend_a, backend_b))
    return compare_models(model_a, model_b, data, options_a=a, options_b=b,
                          **_given(batch=batch, limit=limit, latency_iters=latency_iters))


@dataclass(frozen=True)
class Predictions:
    """What `AdaptiveLoop.infer` returns for a batch of N frames."""

    logits: np.ndarray       # float32 (N, classes)
    classes: np.ndarray      # int64 (N,): the predicted class (-1 where the logits were not finite)
    confidence: np.ndarray   # float (N,): the top softmax probability (NaN where not finite)
    round: int               # the loop round whose model answered


class AdaptiveLoop:
    """The device loop, fed by the application (docs/api.md). `infer(frames)` answers from the model that
    serves now and never waits for adaptation; rounds run in a background thread with the `loop` command's
    gates, swap, state folder (`state`; reopening it resumes), `publish` repository and cooperative stop.
    Use it as a context manager, from one thread.

    `model`: an adapted checkpoint to keep adapting (needs PyTorch); without it the loop only serves `onnx`
    (or `engine`). `max_memory` (bytes, or a size such as "2GB") bounds the process's peak while a round
    runs, as the `loop` command's --max-memory does. Other arguments, left None, take the `loop` command's
    defaults; `on_notice` gets each problem serving survives (a failed round, a full disk, a failed publish)
    as one line."""

    def __init__(self, state: str | Path, *, model: str | Path | None = None, onnx: str | Path | None = None,
                 engine: str | Path | None = None, every: int | None = None, interval: float | None = None,
                 buffer: int | None = None, holdout: float | None = None, min_frames: int | None = None,
                 window: int | None = None, probe: str | None = None, recovery: int | None = None,
                 lr: float | None = None, adapt_threads: int | None = None, serve_threads: int | None = None,
                 publish: str | None = None, keep: int | None = None, shift_trigger: bool = True,
                 max_memory: int | str | None = None, trust_model_code: bool = False, verify: bool = True,
                 on_notice: Callable[[str], None] | None = None) -> None:
        def path(p: str | Path | None) -> Path | None:
            return None if p is None else Path(p)

        config = LoopConfig(state=Path(state), source=APP_SOURCE, model=path(model), onnx=path(onnx),
                            engine=path(engine), consent=CodeConsent(any_code=trust_model_code), verify=verify,
                            shift=ShiftConfig() if shift_trigger else None, publish=publish,
                            max_memory=parse_size(max_memory) if isinstance(max_memory, str) else max_memory,
                            **_given(every=every, interval=interval, buffer=buffer, holdout=holdout,
                                     min_frames=min_frames, window=window, probe=probe, recovery=recovery, lr=lr,
                                     adapt_threads=adapt_threads, serve_threads=serve_threads, keep=keep))
        self._session = LoopSession(config, on_notice=on_notice)
        self._lock = threading.Lock()
        self._result: LoopResult | None = None

    def __enter__(self) -> AdaptiveLoop:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> None:
        """Start (or resume) the loop: state folder, serving model, log, background worker."""
        if not self._session.started:
            self._session.start()

    def close(self) -> LoopResult:
        """Stop the worker (its round in flight is dropped), close the model and the log; idempotent."""
        if self._result is None:
            with self._lock:
                if self._session.reason == "source exhausted":
                    self._session.reason = "closed"
                self._result = self._session.close(finish=False)
        return self._result

    @property
    def input(self) -> tuple[str, tuple[int | str | None, ...], str]:
        """The model's input: (name, shape with the batch axis first, dtype)."""
        info = self._session.input
        if info is None:
            raise GprebnError("open the AdaptiveLoop first (`with AdaptiveLoop(...) as loop:`)")
        return info.name, info.shape, info.dtype

    def _expected(self) -> str:
        name, shape, dtype = self.input
        dims = ", ".join("N" if i == 0 else str(d) for i, d in enumerate(shape))
        return f"{dtype} frames of shape ({dims}) (the model's input {name!r}, preprocessed; loop.prepare(images) " \
               "turns uint8 RGB images into them)"

    def _check(self, frames: Any) -> np.ndarray:
        name, shape, dtype = self.input
        x = frames if isinstance(frames, np.ndarray) else None
        if x is not None and x.ndim == len(shape) - 1:
            x = x[None]
        fits = (x is not None and x.dtype == np.dtype(dtype) and x.ndim == len(shape) and len(x) > 0
                and all(not isinstance(d, int) or d == n for d, n in zip(shape[1:], x.shape[1:], strict=True)))
        if not fits:
            got = (f"{frames.dtype} of shape {tuple(frames.shape)}" if isinstance(frames, np.ndarray)
                   else type(frames).__name__)
            raise InputError(f"infer expects {self._expected()}; got {got}")
        assert x is not None
        return np.ascontiguousarray(x)

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images (H, W, 3) or (N, H, W, 3) -> the model's input, with the preprocessing the model
        records; where it records no size, each image is resized (shorter side) and center-cropped to the
        model's input size, as the loop does with a camera's frames."""
        p = self._session.preprocess
        _, shape, _ = self.input
        if p is None:
            raise GprebnError("open the AdaptiveLoop first (`with AdaptiveLoop(...) as loop:`)")
        x = images[None] if isinstance(images, np.ndarray) and images.ndim == 3 else images
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            got = f"{x.dtype} of shape {x.shape}" if isinstance(x, np.ndarray) else type(images).__name__
            raise InputError(f"prepare expects uint8 RGB images of shape (H, W, 3) or (N, H, W, 3); got {got}")
        h, w = shape[2], shape[3]
        if p.resize is None and p.crop is None and isinstance(h, int) and h == w and x.shape[1:3] != (h, w):
            p = Preprocess(resize=h, crop=h, mean=p.mean, std=p.std)
        return p.normalize(p.geometry_array(x))

    def infer(self, frames: np.ndarray, labels: Sequence[int] | None = None) -> Predictions:
        """Logits and predictions of the model that serves now, for preprocessed frames (one (C, H, W) or a
        batch (N, C, H, W)); the frames join the adaptation buffer. `labels`, when known, go into the metrics
        log's accuracy. Never waits for a round. A frame of the wrong shape or dtype raises InputError naming
        the expected input, and the loop goes on."""
        x = self._check(frames)
        if labels is not None and len(labels) != len(x):
            raise InputError(f"infer got {len(x)} frames but {len(labels)} labels")
        with self._lock:
            if self._result is not None:
                raise GprebnError("this AdaptiveLoop is closed")
            logits = self._session.serve(x, None if labels is None else [int(y) for y in labels])
            served = self._session.served_round
        classes, confidence = frame_predictions(logits)
        return Predictions(logits, classes, confidence, served)

    def status(self) -> LoopStatus:
        """Which round serves, frames served, rounds, swaps, and what the last round decided and why."""
        return self._session.status()

    @property
    def log(self) -> Path:
        """The metrics log (gprebn-edge loop-report reads it)."""
        return self._session.dir.log_file
