"""`gprebn-edge loop`: serve frames with the current model while re-adapting it in the background, and swap
in a new model only after it passed its gates (docs/design.md).

Serving (the calling thread): frames are read in order, one at a time, from the source and run through the
serving runner (onnxruntime, or a TensorRT engine); every frame goes into a bounded buffer. The buffer is a
sliding window of the latest `buffer` frames, not a reservoir: after a shift, the recent frames are the new
domain, and a reservoir would keep mixing in the old one for a long time and slow the adaptation down.

Re-adaptation (one background thread): every `every` frames (or `interval` seconds), if no round is
running, a snapshot of the buffer is handed to the worker, so serving never waits. A thread rather than a
process: the model, the adapter state and the optimizer live across rounds and would have to be pickled to
and from a process each round; torch and onnxruntime release the GIL in their kernels, so the serving
thread keeps running (the worker gets `threads` torch threads, serving its own onnxruntime threads); and
one process keeps the memory of a Jetson, shared between CPU and GPU, to one copy. The worker continues
GpreBN on the older part of the snapshot, freezes a candidate, folds and exports it (parity-checked), then
gates it on the newest part (held back from adaptation): finite outputs, entropy and prediction diversity
not collapsed, agreement with the serving model, and optionally accuracy on a labeled probe set. A passing
candidate is persisted (checkpoint, ONNX, then state.json) and handed to the serving thread, which swaps
it in between two frames; a failing one is logged with its reasons and deleted. After `recovery`
consecutive failures, adaptation restarts from the serving (last good) checkpoint.

TensorRT: the candidate engine is a refit of a copy of the serving engine's bytes with the candidate's
folded weights (by name; the engine must be built with --refittable), written as a new engine file: the
serving engine and its context are never touched (double-buffered). Unverified on a GPU so far.

Everything on disk is written atomically (see state.py); a kill at any moment leaves a servable state,
and a restart with the same --state resumes from it (skipping the frames already served in a finite
source)."""

from __future__ import annotations

import math
import os
import queue
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gprebn_edge.consent import CodeConsent, require_consent
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import collect, open_source
from gprebn_edge.device.gates import GateConfig
from gprebn_edge.device.metrics_log import MetricsLog
from gprebn_edge.device.shift import ShiftConfig, ShiftDetector
from gprebn_edge.device.state import LoopState, StateDir
from gprebn_edge.device.window import Window, segment_names
from gprebn_edge.device.worker import Job, Shared, Worker, one_line
from gprebn_edge.errors import ArtifactError, GprebnError, InputError
from gprebn_edge.io import atomic_path
from gprebn_edge.runtime.base import Runner
from gprebn_edge.runtime.loading import manifest_beside, model_metadata, open_runner, verify_file

__all__ = ["LoopConfig", "LoopResult", "run_loop"]

SERVING_SWITCH_INTERVAL = 0.0005  # seconds: how long serving may wait for the GIL while a round runs
WORKER_FINISH_TIMEOUT = 600.0     # seconds the round in flight may take to finish when the source ends
WORKER_STOP_TIMEOUT = 30.0        # seconds the worker may take to drop its round on Ctrl-C/SIGTERM or an error


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


class _Run:
    """What one run of the serving loop counts and holds."""

    def __init__(self, state: LoopState, resumed: bool, runner: Runner, config: LoopConfig) -> None:
        self.state = state
        self.runner = runner
        self.served_round, self.frames = state.round, state.frames
        self.swaps = self.rounds = self.passed = self.rollbacks = 0
        self.errors: list[str] = []
        live = config.source.startswith("camera:")  # a camera has no past frames to skip on resume
        self.skip = state.frames if resumed and not live else 0
        self.next_round_id = state.rounds_tried + 1
        self.last_trigger_frames, self.last_trigger_time = self.frames, time.perf_counter()
        self.next_frame_time = time.perf_counter()
        self.buffer: deque[np.ndarray] = deque(maxlen=config.buffer)
        self.window = Window()
        self.names: list[str] | None = None
        self.reason = "source exhausted"
        self.worker_abandoned = False
        self.shift = ShiftDetector(config.shift) if config.shift is not None else None
        self.shift_at: int | None = None  # the frame a detected shift began at, until its round starts
        self.domain_start = 0             # the frame the current domain began at (the last detected shift)
        self.shift_reason = ""


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


class _Loop:
    def __init__(self, config: LoopConfig, on_window: Callable[[dict[str, Any]], None] | None,
                 on_notice: Callable[[str], None] | None, should_stop: Callable[[], bool] | None) -> None:
        config.check()
        self.config = config
        self.should_stop = should_stop or (lambda: False)
        self.raise_interrupt = False
        self.on_window = on_window
        self.on_notice = on_notice
        self.dir = StateDir(config.state)
        self.adapting = config.model is not None
        self.log: MetricsLog | None = None
        self._reported: set[str] = set()
        self._report_lock = threading.Lock()

    def report(self, message: str) -> None:
        """One line on stderr (through `on_notice`) and in the log, once per distinct message; from any thread."""
        with self._report_lock:
            if message in self._reported:
                return
            self._reported.add(message)
        if self.on_notice is not None:
            self.on_notice(message)
        if self.log is not None:
            self.log.write("error", message=message)

    def disk_error(self, e: OSError) -> None:
        self.report(f"cannot write under --state {self.dir.path} ({e.strerror or e}): serving goes on; free space "
                    "there so that rounds and metrics are saved again")

    # -- start / resume -----------------------------------------------------------------------------
    def _initial_state(self) -> LoopState:
        c = self.config
        if c.model is None and c.onnx is None and c.engine is None:
            raise InputError("give --model (to adapt) and/or --onnx/--engine (what serves)")
        self._check_inputs()
        self.dir.create()
        checkpoint = ""
        if c.model is not None:
            checkpoint = self.dir.round_path(0, ".safetensors").name
            _copy_atomic(Path(c.model), self.dir.path / checkpoint)
        onnx = self.dir.round_path(0, ".onnx")
        if c.onnx is not None:
            _copy_atomic(Path(c.onnx), onnx)
        elif c.engine is None:
            from gprebn_edge.export.pipeline import export_artifact  # torch: only to export the first model

            export_artifact(self.dir.path / checkpoint, onnx, check_images=256, consent=c.consent)
        engine = None
        if c.engine is not None:  # with its manifest: the engine's preprocessing and classes are recorded there
            engine = self.dir.round_path(0, ".engine").name
            _copy_atomic(Path(c.engine), self.dir.path / engine)
            if manifest_beside(c.engine).is_file():
                _copy_atomic(manifest_beside(c.engine), manifest_beside(self.dir.path / engine))
        return LoopState(round=0, checkpoint=checkpoint, onnx=onnx.name if onnx.exists() else "",
                         engine=engine, source=c.source, rounds_tried=0)

    def _check_inputs(self) -> None:
        """Refuse a bad --model/--onnx/--engine before anything is copied into the state folder."""
        c = self.config
        served = c.onnx or c.engine
        if c.engine is not None and c.verify:
            verify_file(c.engine)
        served_meta = model_metadata(served) if served is not None else None
        if served_meta is not None and not served_meta.get("preprocess"):
            raise InputError(f"{served} does not record its preprocessing: serve an ONNX file exported by gprebn-edge "
                             "(or keep the engine's manifest, NAME.manifest.json, beside it)")
        if c.model is not None:
            from gprebn_edge.checkpoint import load_checkpoint  # torch: adapting needs it anyway

            _, meta = load_checkpoint(c.model)
            _require_consent(c.model, meta, c.consent)
            if served is None and meta.get("preprocess"):  # a bad --source fails before the state is made
                self._frames(c.source, Preprocess.from_dict(meta["preprocess"]), None)
            classes = meta.get("num_classes")
            if served_meta is not None and served_meta.get("num_classes") not in (None, classes):
                raise InputError(f"{served} has {served_meta['num_classes']} classes but --model {c.model} has "
                                 f"{classes}: serve an export of that checkpoint")
        if c.onnx is not None:
            # a file onnxruntime cannot load, or that differs from its manifest, fails here
            with open_runner(c.onnx, "onnxruntime", verify=c.verify) as probe:
                if len(probe.inputs()) != 1:
                    raise InputError(f"{c.onnx} expects {len(probe.inputs())} inputs; the loop serves models with one "
                                     "image input")
                if served_meta and served_meta.get("preprocess"):  # one frame through it: sizes must fit
                    frames = self._frames(c.source, Preprocess.from_dict(served_meta["preprocess"]), probe)
                    for batch in frames.batches(1):
                        _require_finite(probe.infer(batch.images), c.onnx)
                        break

    def _open(self, state: LoopState) -> Runner:
        if state.engine:
            return open_runner(self.dir.path / state.engine, "tensorrt", verify=self.config.verify)
        return open_runner(self.dir.path / state.onnx, "onnxruntime", threads=self.config.serve_threads,
                           shared_cpu=self.adapting, verify=self.config.verify)

    def _model_file(self, state: LoopState) -> Path:
        return self.dir.path / (state.engine or state.onnx)

    # -- the worker -----------------------------------------------------------------------------------
    # -- serving ----------------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        c = self.config
        state = self.dir.read()
        if state is not None and state.source is not None and state.source != c.source:
            # a finite source resumes by skipping the frames already served: another source would be skipped
            # into (or past its end) and serve nothing
            raise InputError(f"--state {self.dir.path} was serving --source {state.source}, not {c.source}: give "
                             "the same --source to resume, or a new --state folder")
        existed = self.dir.path.is_dir()
        before = set(os.listdir(self.dir.path)) if existed else set()
        self.serving_started = False
        try:
            result = self._run(state)
        except BaseException:
            if state is None and not self.serving_started:  # a failed (or interrupted) start leaves nothing
                self._undo_start(existed, before)
            raise
        if state is None and not self.serving_started and result.stop_reason == "interrupted":
            self._undo_start(existed, before)  # stopped before its first frame: as if it never started
            raise KeyboardInterrupt
        return result

    def _stop_point(self) -> None:
        """Between two start-up steps: act on a stop request (the start is then undone)."""
        if self.should_stop():
            raise KeyboardInterrupt

    def _undo_start(self, existed: bool, before: set[str]) -> None:
        if self.log is not None:
            self.log.close()
        if not existed:
            shutil.rmtree(self.dir.path, ignore_errors=True)
            return
        for name in set(os.listdir(self.dir.path)) - before:
            path = self.dir.path / name
            if path.is_file():
                path.unlink(missing_ok=True)

    def _run(self, state: LoopState | None) -> LoopResult:
        c = self.config
        started = time.perf_counter()
        resumed = state is not None
        self.dir.clean(state)
        if state is None:
            state = self._initial_state()
            self._stop_point()
            self.dir.write(state)
            self.dir.clean(state)
        if self.adapting and not state.checkpoint:
            raise InputError(f"{self.dir.state_file} was written by a loop without --model; use a new --state")
        if self.adapting and resumed:  # the state folder's checkpoint names the code adaptation rebuilds
            from gprebn_edge.checkpoint import load_checkpoint

            checkpoint = self.dir.path / state.checkpoint
            _require_consent(checkpoint, load_checkpoint(checkpoint)[1], c.consent)
        self.shared = Shared(state)
        try:
            self.log = MetricsLog(self.dir.log_file, on_error=self.disk_error)
        except OSError as e:
            raise GprebnError(f"cannot open {self.dir.log_file} ({e.strerror or e})") from None
        meta = model_metadata(self.dir.path / state.onnx) if state.onnx else model_metadata(self._model_file(state))
        if not meta.get("preprocess"):
            raise InputError(f"{self._model_file(state)} does not record its preprocessing: serve an ONNX file "
                             "exported by gprebn-edge (or keep the engine's manifest beside it)")
        preprocess = Preprocess.from_dict(meta["preprocess"])
        self.probe = None
        if c.probe is not None:
            images, labels = collect(open_source(c.probe, preprocess, limit=c.probe_limit))
            if labels is None:
                raise InputError(f"--probe {c.probe} has no labels: a probe set needs class subfolders or labels")
            self.probe = (images, labels)
        self._stop_point()
        runner = self._open(state)
        runner.activate()
        if self.should_stop():
            runner.deactivate()
            raise KeyboardInterrupt
        return self._serve(state, resumed, runner, preprocess, started)  # it deactivates the runner

    def _serve(self, state: LoopState, resumed: bool, runner: Runner, preprocess: Preprocess,
               started: float) -> LoopResult:
        """Serve frames until the source ends, the frame limit, or a stop request; then stop the worker and close
        everything (on every path), and say why it stopped."""
        assert self.log is not None
        run = _Run(state, resumed, runner, self.config)
        jobs: queue.Queue[Job | None] = queue.Queue(maxsize=1)
        worker: threading.Thread | None = None
        switch_interval = sys.getswitchinterval()
        finished = False
        try:
            source = self.source = self._frames(self.config.source, preprocess, runner)
            run.names = segment_names(source)
            self.log.write("start", resumed=resumed, round=state.round, frames=state.frames,
                           config=_config_record(self.config), adapting=self.adapting)
            if self.adapting:
                worker = self._start_worker(jobs)
            self._serve_frames(run, source, worker, jobs)
            finished = run.reason != "interrupted"
        except KeyboardInterrupt:  # a library caller's Ctrl-C, raised at any point: stop the same way
            run.reason = "interrupted"
            raise
        finally:
            self._finish(run, worker, jobs, finished, switch_interval)
        if self.raise_interrupt:
            raise KeyboardInterrupt
        return LoopResult(frames=run.frames, rounds=run.rounds, passed=run.passed, swaps=run.swaps,
                          rollbacks=run.rollbacks, served_round=run.served_round, resumed=resumed,
                          seconds=time.perf_counter() - started, stop_reason=run.reason, log=self.dir.log_file,
                          skipped=len(getattr(self.source, "skipped", [])), errors=run.errors,
                          worker_abandoned=run.worker_abandoned)

    def _start_worker(self, jobs: queue.Queue[Job | None]) -> threading.Thread:
        assert self.log is not None
        work = Worker(self.config, self.dir, self.shared, self.log, self.probe, self._open, self.report)
        # the worker runs Python between its kernels while holding the GIL; the default 5 ms switch interval
        # would let it keep serving waiting that long, which is what a frame's p99 then shows (put back in _finish)
        sys.setswitchinterval(SERVING_SWITCH_INTERVAL)
        worker = threading.Thread(target=work.run, args=(jobs,), name="gprebn-readapt", daemon=True)
        worker.start()
        return worker

    def _serve_frames(self, run: _Run, source: Any, worker: threading.Thread | None,
                      jobs: queue.Queue[Job | None]) -> None:
        c = self.config
        for batch in source.batches(1):
            if self.should_stop():  # Ctrl-C/SIGTERM: acted on here, between two frames, never inside native code
                run.reason = "interrupted"
                return
            if run.skip:
                run.skip -= 1
                continue
            if c.fps is not None:  # a camera delivers frames at its own rate
                run.next_frame_time += 1.0 / c.fps
                time.sleep(max(0.0, run.next_frame_time - time.perf_counter()))
            if c.max_frames is not None and run.frames >= c.max_frames:
                run.reason = "frame limit reached"
                return
            self._swap_if_ready(run)
            with self.shared.lock:
                busy = self.shared.busy
            self._serve_one(run, batch, busy)
            # a worker that died (it reported why) gets no jobs: a put with no consumer would block forever
            if worker is not None and worker.is_alive() and not busy:
                self._maybe_start_round(run, jobs)
        run.reason = "source exhausted"

    def _swap_if_ready(self, run: _Run) -> None:
        """Swap in the candidate the worker persisted, between two frames. Its runner is opened and activated
        here, on the serving thread that uses it (a CUDA/TensorRT context is not handed between threads)."""
        with self.shared.lock:
            pending, self.shared.pending = self.shared.pending, None
        if pending is None:
            return
        t0 = time.perf_counter()
        try:
            new = self._open(pending.state)
            new.activate()
        except Exception as e:  # serving goes on with the current model; the state folder already names the new
            self.report(f"could not open round {pending.state.round} to serve it ({one_line(e)}); serving goes on "
                        f"with round {run.served_round}")
            return
        run.runner.deactivate()
        run.runner, run.served_round = new, pending.state.round
        run.swaps += 1
        if run.shift is not None:
            run.shift.reset()  # the new model's outputs: a new reference once its first window is full
        assert self.log is not None
        self.log.write("swap", round=run.served_round, frames=run.frames,
                       open_ms=round((time.perf_counter() - t0) * 1e3, 3))

    def _serve_one(self, run: _Run, batch: Any, busy: bool) -> None:
        t0 = time.perf_counter()
        logits = run.runner.infer(batch.images)
        ms = (time.perf_counter() - t0) * 1e3
        if not self.serving_started:  # this run's first frame: a model that gives NaN/Inf does not start serving
            run.reason = "non-finite model"
            _require_finite(logits, self._model_file(run.state))
            run.reason = "source exhausted"
            self.serving_started = True
        run.frames += 1
        segment = run.names[int(batch.segment[0])] if run.names and hasattr(batch, "segment") else None
        run.window.add(logits[0], ms, busy, None if batch.labels is None else int(batch.labels[0]), segment,
                       run.frames - 1)
        run.buffer.append(batch.images[0])
        if run.shift is not None:
            run.shift.update(batch.images[0], logits[0])
        if run.window.n >= self.config.window:
            self._flush(run.window, run.frames, run.served_round)
            run.window = Window()

    def _maybe_start_round(self, run: _Run, jobs: queue.Queue[Job | None]) -> None:
        """Start a round on the cadence (--every/--interval) or, earlier, once a detected shift has
        `min_frames` frames of the new domain in the buffer. Every round after a detected shift adapts on the
        frames since it only: frames of the old domain would pull the statistics back."""
        c = self.config
        trigger = self._shift_trigger(run)
        if trigger is None:
            due = (run.frames - run.last_trigger_frames >= c.every if c.every is not None
                   else time.perf_counter() - run.last_trigger_time >= (c.interval or 0))
            if not due or min(len(run.buffer), run.frames - run.domain_start) < c.min_frames:
                return
            trigger = "cadence"
        else:
            run.domain_start = run.shift_at or 0
        frames = list(run.buffer)[-(run.frames - run.domain_start):]
        with self.shared.lock:
            self.shared.busy = True
            self.shared.state.rounds_tried = run.next_round_id
        try:  # the frames are stacked on the worker: serving only copies the buffer's references
            jobs.put_nowait(Job(run.next_round_id, frames, run.frames, trigger))
        except queue.Full:  # cannot happen while busy is honoured; never block serving on it
            with self.shared.lock:
                self.shared.busy = False
            return
        run.next_round_id += 1
        run.last_trigger_frames, run.last_trigger_time = run.frames, time.perf_counter()
        run.shift_at = None
        if run.shift is not None and run.shift.full:
            run.shift.set_reference()  # the new domain is the reference now: the same shift does not fire again

    def _shift_trigger(self, run: _Run) -> str | None:
        """"shift: <what moved>" once a detected shift has min_frames new frames, else None."""
        if run.shift is None:
            return None
        if run.shift.full and not run.shift.has_reference:
            run.shift.set_reference()  # the first full window of this model's outputs
        if run.shift_at is None:
            reason = run.shift.check()
            if reason is None:
                return None
            run.shift_at = max(0, run.frames - run.shift.config.window)
            run.shift_reason = reason
            assert self.log is not None
            self.log.write("shift", frames=run.frames, reason=reason, detector=run.shift.state())
        if run.frames - run.shift_at < min(self.config.min_frames, self.config.buffer):
            return None
        return f"shift: {run.shift_reason}"

    def _finish(self, run: _Run, worker: threading.Thread | None, jobs: queue.Queue[Job | None], finished: bool,
                switch_interval: float) -> None:
        """On every way out: the last window, the worker stopped (bounded), the runners closed, the log's last
        record. A stop request while the last round finishes drops that round and stops as asked."""
        assert self.log is not None
        if run.window.n:
            self._flush(run.window, run.frames, run.served_round)
        if worker is not None:
            interrupted, run.worker_abandoned = self._stop_worker(worker, jobs, finish=finished)
            if interrupted:
                run.reason = "interrupted"
        sys.setswitchinterval(switch_interval)
        run.runner.deactivate()
        with self.shared.lock:
            self.shared.pending = None  # passed and persisted: it serves after a restart
            run.rounds, run.passed, run.rollbacks = self.shared.rounds, self.shared.passed, self.shared.rollbacks
            run.errors = list(self.shared.errors)
        self.log.write("stop", frames=run.frames, reason=run.reason, served_round=run.served_round,
                       skipped=len(getattr(self.source, "skipped", [])), errors=run.errors)
        self.log.close()

    def _stop_worker(self, worker: threading.Thread, jobs: queue.Queue[Job | None], finish: bool) -> tuple[bool, bool]:
        """Stop the worker thread before returning: a thread still inside torch or onnxruntime when the
        interpreter exits makes their native thread pools abort the process. At the source's end the round in
        flight finishes and is logged (its swap is not served); on a stop request or an error it is dropped at its
        next step. Bounded either way: a worker that does not stop is reported, never waited for. Returns
        (a stop request came while waiting, the worker is still running)."""
        if not finish:
            self.shared.stop.set()
        deadline = time.monotonic() + (WORKER_FINISH_TIMEOUT if finish else WORKER_STOP_TIMEOUT)
        sent = not finish
        interrupted = False
        while worker.is_alive() and time.monotonic() < deadline:
            try:
                if not interrupted and self.should_stop():
                    interrupted = self._drop_round()
                    deadline = min(deadline, time.monotonic() + WORKER_STOP_TIMEOUT)
                if not sent:
                    try:
                        jobs.put(None, timeout=0.1)
                        sent = True
                    except queue.Full:
                        continue
                worker.join(timeout=0.1)
            except KeyboardInterrupt:  # a library caller's Ctrl-C while the last round finishes: drop it, then
                interrupted = self.raise_interrupt = self._drop_round()  # raise it once everything is closed
                deadline = min(deadline, time.monotonic() + WORKER_STOP_TIMEOUT)
        if worker.is_alive():
            self.shared.stop.set()
            self.report("the adaptation worker did not stop in time; its round is dropped")
        return interrupted, worker.is_alive()

    def _drop_round(self) -> bool:
        self.shared.stop.set()
        return True

    def _frames(self, spec: str, preprocess: Preprocess, runner: Runner | None) -> Any:
        """The frame source, in order: a video file or camera (OpenCV), sized to the runner's input where the
        preprocessing sets no size, else any image source."""
        from gprebn_edge.data.video import VideoFrames, is_video_spec

        if is_video_spec(spec):
            size = None
            if runner is not None:
                shape = list(runner.inputs()[0].shape)
                if len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int):
                    size = (shape[2], shape[3])
            return VideoFrames(spec, preprocess, size=size)
        return open_source(spec, preprocess, shuffle=False)

    def _flush(self, window: Window, frames: int, served_round: int) -> None:
        skipped = len(getattr(self.source, "skipped", []))
        assert self.log is not None
        record = self.log.write("window", frames=frames, served_round=served_round, skipped=skipped,
                                **window.record())
        with self.shared.lock:
            self.shared.state.frames = frames
        try:
            self.shared.persist(self.dir)
        except OSError as e:  # a full disk: serving goes on; the state keeps its last good frame count
            self.disk_error(e)
        if self.on_window is not None:
            self.on_window(record)


def _require_finite(logits: np.ndarray, model: Path) -> None:
    """Refuse to start serving a model whose outputs on the first frame are NaN or infinite."""
    if not np.isfinite(logits).all():
        raise InputError(f"{model} gives non-finite outputs (NaN/Inf) on the first frame: the loop does not serve "
                         "it; serve an export checked by `gprebn-edge export`, or adapt again")


def _require_consent(checkpoint: Path, meta: dict[str, Any], consent: CodeConsent | None) -> None:
    """Refuse, before anything is written or served, a checkpoint naming model code without consent."""
    model = meta.get("model")
    spec = model.get("spec") if isinstance(model, dict) else None
    if not isinstance(spec, str):
        raise ArtifactError(f"{checkpoint}: its metadata field 'model.spec' is missing or not a string: re-create "
                            "it with gprebn-edge adapt")
    require_consent(spec, consent, str(checkpoint))


def _config_record(c: LoopConfig) -> dict[str, Any]:
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in c.__dict__.items()
           if k not in ("gates", "consent", "shift")}
    out["gates"] = c.gates.__dict__
    out["shift"] = None if c.shift is None else asdict(c.shift)
    out["consent"] = None if c.consent is None else asdict(c.consent)
    return out


def run_loop(config: LoopConfig, on_window: Callable[[dict[str, Any]], None] | None = None,
             on_notice: Callable[[str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> LoopResult:
    """Run the device loop until the source ends, `max_frames` frames were served, or Ctrl-C (which
    leaves the state folder servable and resumable). `on_window` gets each window's metrics record;
    `on_notice` each problem serving survives (a worker failure, a full disk), as one line, when it happens.
    Worker failures are also in `LoopResult.errors`. A start that fails leaves no state folder behind.

    `should_stop` is polled between frames and between start-up steps (a CLI's signal handler only sets a
    flag it reads): when it turns true, a start is undone and KeyboardInterrupt raised; while serving, the loop
    stops the worker, closes everything and returns with stop_reason "interrupted". A KeyboardInterrupt raised
    into the loop (Ctrl-C without such a handler) is handled the same way, then raised again."""
    if not isinstance(config.state, Path):
        raise GprebnError("LoopConfig.state must be a Path")
    return _Loop(config, on_window, on_notice, should_stop).run()
