"""The device loop's core: serve frames with the current model while re-adapting it in the background, and swap in
a new model only after it passed its gates (docs/design.md).

`LoopSession` is the loop's one core, under both `gprebn-edge loop` (`loop.run_loop`, which reads a frame
source) and `AdaptiveLoop` (which the application feeds): `start()` (state folder, runner, log, worker), then one
`serve()` per batch of frames, then `close()`. Everything it holds exists from `__init__` on, so every way
out (an error at any start-up step included) closes what was opened and reports the real error.

Serving (the calling thread): frames run through the serving runner (onnxruntime, or a TensorRT engine);
every frame goes into a bounded buffer, a sliding window of the latest `buffer` frames (not a reservoir:
after a shift, the recent frames are the new domain).

Re-adaptation (one background thread, worker.py): every `every` frames (or `interval` seconds), or earlier
when the shift detector (shift.py) sees the stream move, if no round is running, a snapshot of the buffer is
handed to the worker, so serving never waits; after a detected shift the snapshot holds the new domain's
frames only. A thread rather than a process: the model, the adapter state and the optimizer live across
rounds; torch and onnxruntime release the GIL in their kernels; and one process keeps a Jetson's shared
memory to one copy. The worker continues GpreBN on the older part of the snapshot, freezes, folds and
exports a candidate, and gates it on the newest part (gates.py). A passing candidate is persisted
(checkpoint, ONNX, then state.json), published (`publish`, publish.py) and handed to the serving thread,
which swaps it in between two frames; a failing one is logged with its reasons and deleted. After
`recovery` consecutive failures, adaptation restarts from the serving (last good) checkpoint.

Stopping is cooperative, through one StopToken (stop.py) that serving reads between frames and start-up
steps and the worker between two steps; everything is closed before `close` returns.

TensorRT: the candidate engine is a refit of a copy of the serving engine's bytes with the candidate's
folded weights (by name; the engine must be built with --refittable), written as a new engine file: the
serving engine and its context are never touched. Unverified on a GPU so far.

Everything on disk is written atomically (see state.py); a kill at any moment leaves a servable state, and
a restart with the same --state resumes from it (skipping the frames already served in a finite source)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import collect, open_source
from gprebn_edge.device.config import LoopConfig, LoopResult, config_record
from gprebn_edge.device.frames import FrameSource, open_frames
from gprebn_edge.device.metrics_log import MetricsLog
from gprebn_edge.device.publish import Publisher, PublishError
from gprebn_edge.device.shift import ShiftTrigger
from gprebn_edge.device.start import initial_state, require_checkpoint_consent, require_finite
from gprebn_edge.device.state import LoopState, StateDir
from gprebn_edge.device.stop import INTERRUPTED, StopToken
from gprebn_edge.device.window import Window
from gprebn_edge.device.worker import Job, Shared, Worker, describe
from gprebn_edge.device.worker_thread import WorkerThread
from gprebn_edge.errors import GprebnError, InputError
from gprebn_edge.runtime.base import Runner, TensorInfo
from gprebn_edge.runtime.environment import peak_resident_memory, resident_memory
from gprebn_edge.runtime.loading import manifest_beside, model_metadata, open_runner

__all__ = ["LoopSession", "LoopStatus"]


@dataclass(frozen=True)
class LoopStatus:
    """Where a loop stands: which round serves, and what the last adaptation round decided and why."""

    serving_round: int
    frames: int                    # frames served in all (a resumed run counts the earlier ones)
    rounds: int                    # rounds finished in this run
    passed: int
    swaps: int
    rollbacks: int
    fallbacks: int                 # times the start model served again (worker.py: a broken model serving)
    adapting: bool                 # a round is running now
    last_round: dict[str, Any] | None  # its log record: round, outcome (passed/rejected/error), reasons, gates
    errors: tuple[str, ...]        # worker failures (serving went on)


class LoopSession:
    """The loop's core. Use from one thread: `start()`, `serve()` per batch, `close()` (on every path)."""

    def __init__(self, config: LoopConfig, on_window: Callable[[dict[str, Any]], None] | None = None,
                 on_notice: Callable[[str], None] | None = None, stop: StopToken | None = None) -> None:
        self.config = config
        self.stop = stop or StopToken()
        self.on_window = on_window
        self.on_notice = on_notice
        self.dir = StateDir(config.state)
        self.adapting = config.model is not None
        self.publisher = Publisher(config.publish, config.keep) if config.publish else None
        self.log: MetricsLog | None = None
        self.shared = Shared(LoopState(round=0, checkpoint="", onnx=""), self.stop)  # replaced by start()
        self.runner: Runner | None = None
        self.worker: WorkerThread | None = None
        self.preprocess: Preprocess | None = None
        self.input: TensorInfo | None = None
        self.probe: tuple[np.ndarray, np.ndarray] | None = None
        self.resumed = False
        self.started = self.first_served = self.closed = False
        self.started_at = time.perf_counter()
        self._undo: tuple[bool, set[str]] | None = None  # a fresh start: (the folder existed, what was in it)
        self.frames = self.served_round = self.swaps = self.next_round_id = 0
        self.reason = "source exhausted"
        self.window = Window()
        self.buffer: deque[np.ndarray] = deque(maxlen=config.buffer)
        self.shift = ShiftTrigger(config.shift, config.min_frames, config.buffer, self._log_shift)
        self.last_trigger_frames, self.last_trigger_time = 0, time.perf_counter()
        self.worker_abandoned = False
        self.skipped = 0  # unreadable frames the source skipped (run_loop sets it from its frame source)
        self._reported: set[str] = set()
        self._report_lock = threading.Lock()

    # -- notices ----------------------------------------------------------------------------------------
    def report(self, message: str, event: str = "error") -> None:
        """One line on stderr (through `on_notice`) and in the log (as `event`: "error", or "notice" for what
        the loop decided by itself), once per distinct message; from any thread."""
        with self._report_lock:
            if message in self._reported:
                return
            self._reported.add(message)
        if self.on_notice is not None:
            self.on_notice(message)
        if self.log is not None:
            self.log.write(event, message=message)

    def disk_error(self, e: OSError) -> None:
        self.report(f"cannot write under --state {self.dir.path} ({e.strerror or e}): serving goes on; free space "
                    "there so that rounds and metrics are saved again")

    # -- start-up ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Check the inputs, make (or resume) the state folder, open the log and the serving runner, start
        the worker. A fresh start that fails, or is stopped, leaves nothing behind."""
        c = self.config
        state = self.dir.read()
        if state is not None and state.source is not None and state.source != c.source:
            # a finite source resumes by skipping the frames already served: another source would be skipped
            # into (or past its end) and serve nothing
            raise InputError(f"--state {self.dir.path} was serving --source {state.source}, not {c.source}: give "
                             "the same --source to resume, or a new --state folder")
        self.resumed = state is not None
        if state is None:
            existed = self.dir.path.is_dir()
            self._undo = (existed, set(os.listdir(self.dir.path)) if existed else set())
        try:
            self._start(state)
        except BaseException:
            self.close(finish=False, failed=True)
            raise
        self.started = True

    def _stop_point(self) -> None:
        """Between two start-up steps: act on a stop request (the start is then undone)."""
        if self.stop.is_set():
            raise KeyboardInterrupt

    def _start(self, state: LoopState | None) -> None:
        c = self.config
        self.dir.clean(state)
        if state is None:
            state = initial_state(c, self.dir)
            self._stop_point()
            self.dir.write(state)
            self.dir.clean(state)
        if self.adapting and not state.checkpoint:
            raise InputError(f"{self.dir.state_file} was written by a loop without --model; use a new --state")
        if self.adapting and self.resumed:  # the state folder's checkpoint names the code adaptation rebuilds
            from gprebn_edge.checkpoint import load_checkpoint

            checkpoint = self.dir.path / state.checkpoint
            require_checkpoint_consent(checkpoint, load_checkpoint(checkpoint)[1], c.consent)
        self.shared = Shared(state, self.stop)
        self.frames, self.served_round = state.frames, state.round
        self.last_trigger_frames = state.frames
        self.next_round_id = state.rounds_tried + 1
        try:
            self.log = MetricsLog(self.dir.log_file, on_error=self.disk_error)
        except OSError as e:
            raise GprebnError(f"cannot open {self.dir.log_file} ({e.strerror or e})") from None
        meta = model_metadata(self.dir.path / state.onnx) if state.onnx else model_metadata(self._model_file(state))
        if not meta.get("preprocess"):
            raise InputError(f"{self._model_file(state)} does not record its preprocessing: serve an ONNX file "
                             "exported by gprebn-edge (or keep the engine's manifest beside it)")
        self.preprocess = Preprocess.from_dict(meta["preprocess"])
        if c.probe is not None:
            images, labels = collect(open_source(c.probe, self.preprocess, limit=c.probe_limit))
            if labels is None:
                raise InputError(f"--probe {c.probe} has no labels: a probe set needs class subfolders or labels")
            self.probe = (images, labels)
        self._stop_point()
        self.runner = self._open(state)
        self.runner.activate()
        self.input = self.runner.inputs()[0]
        self._stop_point()
        self.log.write("start", resumed=self.resumed, round=state.round, frames=state.frames,
                       config=config_record(c), adapting=self.adapting)
        self._publish(state)
        if self.adapting:
            self.worker = WorkerThread(Worker(c, self.dir, self.shared, self.log, self.probe, self._open,
                                              self.report, self._publish if self.publisher else None))

    def _open(self, state: LoopState) -> Runner:
        if state.engine:
            return open_runner(self.dir.path / state.engine, "tensorrt", verify=self.config.verify)
        return open_runner(self.dir.path / state.onnx, "onnxruntime", threads=self.config.serve_threads,
                           shared_cpu=self.adapting, verify=self.config.verify)

    def _model_file(self, state: LoopState) -> Path:
        return self.dir.path / (state.engine or state.onnx)

    def open_frames(self, spec: str) -> FrameSource:
        """The frame source `spec`, preprocessed as the serving model records (after start)."""
        assert self.preprocess is not None and self.input is not None
        return open_frames(spec, self.preprocess, self.input.shape)

    def _publish(self, state: LoopState) -> None:
        """The model `state` serves, to the --publish repository; a failure is reported and serving goes on."""
        if self.publisher is None or self.log is None:
            return
        model = self._model_file(state)
        manifest = manifest_beside(self.dir.path / state.onnx) if state.onnx else manifest_beside(model)
        try:
            published = self.publisher.publish(model, manifest, state.round)
        except PublishError as e:
            self.log.write("publish", round=state.round, ok=False, error=str(e))
            self.report(f"{e}: serving goes on, and the repository keeps its last complete version")
            return
        if published is not None:
            self.log.write("publish", round=state.round, ok=True, version=published.version,
                           path=str(self.publisher.root / str(published.version)))

    # -- serving ----------------------------------------------------------------------------------------
    def serve(self, images: np.ndarray, labels: Sequence[int | None] | None = None,
              segments: Sequence[str | None] | None = None) -> np.ndarray:
        """Run a batch of preprocessed frames (float32 NCHW) through the serving model, between two swaps;
        account each frame (window, buffer, shift detector) and start a round when one is due."""
        assert self.runner is not None, "start() the session first"
        self._swap_if_ready()
        with self.shared.lock:
            busy = self.shared.busy
        t0 = time.perf_counter()
        logits = self.runner.infer(images)
        ms = (time.perf_counter() - t0) * 1e3 / len(images)
        if not self.first_served:  # the first frame: a model that gives NaN/Inf does not start serving
            self.reason = "non-finite model"
            require_finite(logits, self._model_file(self.shared.state))
            self.reason = "source exhausted"
            self.first_served = True
        for i in range(len(images)):
            self.frames += 1
            self.window.add(logits[i], ms, busy, None if labels is None else labels[i],
                            None if segments is None else segments[i], self.frames - 1)
            self.buffer.append(np.array(images[i]))  # a copy: a caller may reuse its array
            self.shift.observe(self.frames, images[i], logits[i])
            if self.window.n >= self.config.window:
                self._flush()
        # a worker that died (it reported why) gets no jobs: a put with no consumer would block forever
        if self.worker is not None and self.worker.alive and not busy:
            self._maybe_start_round()
        return logits

    def _swap_if_ready(self) -> None:
        """Swap in the candidate the worker persisted, between two frames. A runner that may change threads
        (onnxruntime on the CPU) comes active from the worker, so serving does not stall while a session is
        created; one bound to its thread (TensorRT, CUDA) is opened and activated here, on the thread that
        uses it. The swap record's open_ms says how long serving waited."""
        with self.shared.lock:
            pending, self.shared.pending = self.shared.pending, None
        if pending is None:
            return
        assert self.runner is not None and self.log is not None
        t0 = time.perf_counter()
        new = pending.runner
        if new is None:  # bound to a thread (TensorRT, CUDA): opened here, on the thread that will use it
            try:
                new = self._open(pending.state)
                new.activate()
            except Exception as e:  # serving goes on with the current model; the state folder already names the new
                self.report(f"could not open round {pending.state.round} to serve it ({describe(e)}); serving "
                            f"goes on with round {self.served_round}")
                return
        self.runner.deactivate()
        self.runner, self.served_round = new, pending.state.round
        self.swaps += 1
        self.shift.swapped(pending.reference)
        self.log.write("swap", round=self.served_round, frames=self.frames,
                       open_ms=round((time.perf_counter() - t0) * 1e3, 3))

    def _maybe_start_round(self) -> None:
        """Start a round when the shift trigger asks for one (shift.py) or on the cadence (--every/--interval).
        Every round after a detected shift adapts on the frames since it only: frames of the old domain would
        pull the statistics back."""
        assert self.worker is not None
        c = self.config
        trigger = self.shift.due(self.frames)
        new_frames = self.shift.new_frames(self.frames)
        if trigger is None:
            due = (self.frames - self.last_trigger_frames >= c.every if c.every is not None
                   else time.perf_counter() - self.last_trigger_time >= (c.interval or 0))
            if not due or min(len(self.buffer), new_frames) < c.min_frames:
                return
            trigger = "cadence"
        frames = list(self.buffer)[-new_frames:]
        with self.shared.lock:
            self.shared.busy = True
            self.shared.state.rounds_tried = self.next_round_id
        # the frames are stacked on the worker: serving only copies the buffer's references
        if not self.worker.submit(Job(self.next_round_id, frames, self.frames, trigger)):
            with self.shared.lock:
                self.shared.busy = False
            return
        self.shift.started(trigger, len(frames))
        self.next_round_id += 1
        self.last_trigger_frames, self.last_trigger_time = self.frames, time.perf_counter()

    def _log_shift(self, frame: int, reason: str, detector: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write("shift", frames=frame, reason=reason, detector=detector)

    def _flush(self) -> None:
        assert self.log is not None
        record = self.log.write("window", frames=self.frames, served_round=self.served_round,
                                skipped=self.skipped, **self.window.record(), **memory_record())
        self.window = Window()
        with self.shared.lock:
            self.shared.state.frames = self.frames
        try:
            self.shared.persist(self.dir)
        except OSError as e:  # a full disk: serving goes on; the state keeps its last good frame count
            self.disk_error(e)
        if self.on_window is not None:
            self.on_window(record)

    def status(self) -> LoopStatus:
        with self.shared.lock:
            s = self.shared
            return LoopStatus(serving_round=self.served_round, frames=self.frames, rounds=s.rounds, passed=s.passed,
                              swaps=self.swaps, rollbacks=s.rollbacks, fallbacks=s.fallbacks, adapting=s.busy,
                              last_round=None if s.last_round is None else dict(s.last_round),
                              errors=tuple(s.errors))

    # -- stopping ---------------------------------------------------------------------------------------
    def close(self, finish: bool, failed: bool = False) -> LoopResult:
        """On every way out: the last window, the worker stopped (bounded; with `finish`, its round in flight
        may end first), the runners closed, the log's last record. A fresh start that `failed`, or was
        stopped, before its first frame is undone. Idempotent."""
        if not self.closed:
            self.closed = True
            if failed and self.reason == "source exhausted":
                self.reason = "error"
            try:
                if self.log is not None and self.window.n:
                    self._flush()
                if self.worker is not None:
                    if not finish:
                        self.stop.request(self.reason)
                    self.worker_abandoned = self.worker.stop(finish)
            except KeyboardInterrupt:
                self.stop.request(INTERRUPTED)
                raise
            finally:
                self._release(failed)
        return self._result()

    def _release(self, failed: bool) -> None:
        if self.stop.interrupted:
            self.reason = INTERRUPTED
        with self.shared.lock:
            pending, self.shared.pending = self.shared.pending, None  # passed and persisted, not swapped in
        for runner in (self.runner, None if pending is None else pending.runner):
            if runner is not None:
                runner.deactivate()
        if self.log is not None:
            self.log.write("stop", frames=self.frames, reason=self.reason, served_round=self.served_round,
                           skipped=self.skipped, errors=list(self.shared.errors))
            self.log.close()
        if self._undo is not None and not self.first_served and (failed or self.stop.interrupted):
            self._undo_start(*self._undo)

    def _undo_start(self, existed: bool, before: set[str]) -> None:
        if not existed:
            shutil.rmtree(self.dir.path, ignore_errors=True)
            return
        for name in set(os.listdir(self.dir.path)) - before:
            path = self.dir.path / name
            if path.is_file():
                path.unlink(missing_ok=True)

    @property
    def undone(self) -> bool:
        """The start was undone: stopped before its first frame, as if it never started."""
        return self.closed and self._undo is not None and not self.first_served and self.stop.interrupted

    def _result(self) -> LoopResult:
        with self.shared.lock:
            s = self.shared
            return LoopResult(frames=self.frames, rounds=s.rounds, passed=s.passed, swaps=self.swaps,
                              rollbacks=s.rollbacks, fallbacks=s.fallbacks, served_round=self.served_round,
                              resumed=self.resumed,
                              seconds=time.perf_counter() - self.started_at, stop_reason=self.reason,
                              log=self.dir.log_file, skipped=self.skipped, errors=list(s.errors),
                              worker_abandoned=self.worker_abandoned, peak_rss=peak_resident_memory())


def memory_record() -> dict[str, float | None]:
    """The process's resident memory now and its peak so far, in MB, for a metrics record."""
    def mb(n: int | None) -> float | None:
        return None if n is None else round(n / 1e6, 1)
    return {"rss_mb": mb(resident_memory()), "peak_rss_mb": mb(peak_resident_memory())}
