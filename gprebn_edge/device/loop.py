"""`gprebn-edge loop`: serve frames with the current model while re-adapting it in the background, and swap
in a new model only after it passed its gates (docs/design.md).

Serving (the calling thread): frames are read in order, one at a time, from the source and run through the
serving runner (onnxruntime, or a TensorRT engine); every frame goes into a bounded buffer. The buffer is a
sliding window of the latest `buffer` frames, not a reservoir: after a shift, the recent frames are the new
domain, and a reservoir would keep mixing in the old one for a long time and slow the adaptation down.

Re-adaptation (one background thread, worker.py): every `every` frames (or `interval` seconds), or earlier
when the shift detector (shift.py) sees the stream move, if no round is running, a snapshot of the buffer is
handed to the worker, so serving never waits; after a detected shift the snapshot holds the new domain's
frames only. A thread rather than a
process: the model, the adapter state and the optimizer live across rounds and would have to be pickled to
and from a process each round; torch and onnxruntime release the GIL in their kernels, so the serving
thread keeps running (the worker gets `threads` torch threads, serving its own onnxruntime threads); and
one process keeps the memory of a Jetson, shared between CPU and GPU, to one copy. The worker continues
GpreBN on the older part of the snapshot, freezes a candidate, folds and exports it (parity-checked), then
gates it on the newest part (held back from adaptation) on its merits (gates.py): finite, not collapsed, as
diverse as the serving and source models and agreeing with them above chance where they are evidence (not
degenerate, not on a domain they do not know), or, with a labeled probe set, at least as accurate. A passing
candidate is persisted (checkpoint, ONNX, then state.json) and handed to the serving thread, which opens it
and swaps it in between two frames; a failing one is logged with its reasons and deleted. After
`recovery` consecutive failures, adaptation restarts from the serving (last good) checkpoint.

Stopping (Ctrl-C, SIGTERM) is cooperative: `should_stop` is read between frames and start-up steps, the
worker drops its round at its next step, and everything is closed before run_loop returns.

TensorRT: the candidate engine is a refit of a copy of the serving engine's bytes with the candidate's
folded weights (by name; the engine must be built with --refittable), written as a new engine file: the
serving engine and its context are never touched (double-buffered). Unverified on a GPU so far.

Everything on disk is written atomically (see state.py); a kill at any moment leaves a servable state,
and a restart with the same --state resumes from it (skipping the frames already served in a finite
source)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import collect, open_source
from gprebn_edge.device.config import LoopConfig, LoopResult, config_record
from gprebn_edge.device.metrics_log import MetricsLog
from gprebn_edge.device.shift import ShiftTrigger
from gprebn_edge.device.start import initial_state, open_frames, require_checkpoint_consent, require_finite
from gprebn_edge.device.state import LoopState, StateDir
from gprebn_edge.device.window import Window, segment_names
from gprebn_edge.device.worker import Job, Shared, Worker, one_line
from gprebn_edge.device.worker_thread import WorkerThread
from gprebn_edge.errors import GprebnError, InputError
from gprebn_edge.runtime.base import Runner
from gprebn_edge.runtime.loading import model_metadata, open_runner

__all__ = ["LoopConfig", "LoopResult", "run_loop"]



class _Run:
    """What one run of the serving loop counts and holds."""

    def __init__(self, state: LoopState, resumed: bool, runner: Runner, config: LoopConfig,
                 log_shift: Callable[[int, str, dict[str, Any]], None]) -> None:
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
        self.shift = ShiftTrigger(config.shift, config.min_frames, config.buffer, log_shift)


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

    def _open(self, state: LoopState) -> Runner:
        if state.engine:
            return open_runner(self.dir.path / state.engine, "tensorrt", verify=self.config.verify)
        return open_runner(self.dir.path / state.onnx, "onnxruntime", threads=self.config.serve_threads,
                           shared_cpu=self.adapting, verify=self.config.verify)

    def _model_file(self, state: LoopState) -> Path:
        return self.dir.path / (state.engine or state.onnx)

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
            state = initial_state(self.config, self.dir)
            self._stop_point()
            self.dir.write(state)
            self.dir.clean(state)
        if self.adapting and not state.checkpoint:
            raise InputError(f"{self.dir.state_file} was written by a loop without --model; use a new --state")
        if self.adapting and resumed:  # the state folder's checkpoint names the code adaptation rebuilds
            from gprebn_edge.checkpoint import load_checkpoint

            checkpoint = self.dir.path / state.checkpoint
            require_checkpoint_consent(checkpoint, load_checkpoint(checkpoint)[1], c.consent)
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
        run = _Run(state, resumed, runner, self.config, self._log_shift)
        worker: WorkerThread | None = None
        finished = False
        try:
            source = self.source = open_frames(self.config.source, preprocess, runner)
            run.names = segment_names(source)
            self.log.write("start", resumed=resumed, round=state.round, frames=state.frames,
                           config=config_record(self.config), adapting=self.adapting)
            if self.adapting:
                worker = WorkerThread(Worker(self.config, self.dir, self.shared, self.log, self.probe, self._open,
                                             self.report))
            self._serve_frames(run, source, worker)
            finished = run.reason != "interrupted"
        except KeyboardInterrupt:  # a library caller's Ctrl-C, raised at any point: stop the same way
            run.reason = "interrupted"
            raise
        finally:
            self._finish(run, worker, finished)
        if self.raise_interrupt:
            raise KeyboardInterrupt
        return LoopResult(frames=run.frames, rounds=run.rounds, passed=run.passed, swaps=run.swaps,
                          rollbacks=run.rollbacks, served_round=run.served_round, resumed=resumed,
                          seconds=time.perf_counter() - started, stop_reason=run.reason, log=self.dir.log_file,
                          skipped=len(getattr(self.source, "skipped", [])), errors=run.errors,
                          worker_abandoned=run.worker_abandoned)

    def _serve_frames(self, run: _Run, source: Any, worker: WorkerThread | None) -> None:
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
            if worker is not None and worker.alive and not busy:
                self._maybe_start_round(run, worker)
        run.reason = "source exhausted"

    def _swap_if_ready(self, run: _Run) -> None:
        """Swap in the candidate the worker persisted, between two frames. A runner that may change threads
        (onnxruntime on the CPU) comes active from the worker, so serving does not stall while a session is
        created; one bound to its thread (TensorRT, CUDA) is opened and activated here, on the thread that
        uses it. The swap record's open_ms says how long serving waited."""
        with self.shared.lock:
            pending, self.shared.pending = self.shared.pending, None
        if pending is None:
            return
        t0 = time.perf_counter()
        new = pending.runner
        if new is None:  # bound to a thread (TensorRT, CUDA): opened here, on the thread that will use it
            try:
                new = self._open(pending.state)
                new.activate()
            except Exception as e:  # serving goes on with the current model; the state folder already names the new
                self.report(f"could not open round {pending.state.round} to serve it ({one_line(e)}); serving goes "
                            f"on with round {run.served_round}")
                return
        run.runner.deactivate()
        run.runner, run.served_round = new, pending.state.round
        run.swaps += 1
        run.shift.swapped(pending.reference)
        assert self.log is not None
        self.log.write("swap", round=run.served_round, frames=run.frames,
                       open_ms=round((time.perf_counter() - t0) * 1e3, 3))

    def _serve_one(self, run: _Run, batch: Any, busy: bool) -> None:
        t0 = time.perf_counter()
        logits = run.runner.infer(batch.images)
        ms = (time.perf_counter() - t0) * 1e3
        if not self.serving_started:  # this run's first frame: a model that gives NaN/Inf does not start serving
            run.reason = "non-finite model"
            require_finite(logits, self._model_file(run.state))
            run.reason = "source exhausted"
            self.serving_started = True
        run.frames += 1
        segment = run.names[int(batch.segment[0])] if run.names and hasattr(batch, "segment") else None
        run.window.add(logits[0], ms, busy, None if batch.labels is None else int(batch.labels[0]), segment,
                       run.frames - 1)
        run.buffer.append(batch.images[0])
        run.shift.observe(run.frames, batch.images[0], logits[0])
        if run.window.n >= self.config.window:
            self._flush(run.window, run.frames, run.served_round)
            run.window = Window()

    def _maybe_start_round(self, run: _Run, worker: WorkerThread) -> None:
        """Start a round when the shift trigger asks for one (shift.py) or on the cadence (--every/--interval).
        Every round after a detected shift adapts on the frames since it only: frames of the old domain would
        pull the statistics back."""
        c = self.config
        trigger = run.shift.due(run.frames)
        new_frames = run.shift.new_frames(run.frames)
        if trigger is None:
            due = (run.frames - run.last_trigger_frames >= c.every if c.every is not None
                   else time.perf_counter() - run.last_trigger_time >= (c.interval or 0))
            if not due or min(len(run.buffer), new_frames) < c.min_frames:
                return
            trigger = "cadence"
        frames = list(run.buffer)[-new_frames:]
        with self.shared.lock:
            self.shared.busy = True
            self.shared.state.rounds_tried = run.next_round_id
        # the frames are stacked on the worker: serving only copies the buffer's references
        if not worker.submit(Job(run.next_round_id, frames, run.frames, trigger)):
            with self.shared.lock:
                self.shared.busy = False
            return
        run.shift.started(trigger, len(frames))
        run.next_round_id += 1
        run.last_trigger_frames, run.last_trigger_time = run.frames, time.perf_counter()

    def _log_shift(self, frame: int, reason: str, detector: dict[str, Any]) -> None:
        assert self.log is not None
        self.log.write("shift", frames=frame, reason=reason, detector=detector)

    def _finish(self, run: _Run, worker: WorkerThread | None, finished: bool) -> None:
        """On every way out: the last window, the worker stopped (bounded), the runners closed, the log's last
        record. A stop request while the last round finishes drops that round and stops as asked."""
        assert self.log is not None
        if run.window.n:
            self._flush(run.window, run.frames, run.served_round)
        if worker is not None:
            stopped = worker.stop(finish=finished, should_stop=self.should_stop)
            run.worker_abandoned = stopped.abandoned
            self.raise_interrupt = stopped.keyboard_interrupt
            if stopped.interrupted:
                run.reason = "interrupted"
        run.runner.deactivate()
        with self.shared.lock:
            # passed and persisted but not swapped in: it serves after a restart
            pending, self.shared.pending = self.shared.pending, None
            run.rounds, run.passed, run.rollbacks = self.shared.rounds, self.shared.passed, self.shared.rollbacks
            run.errors = list(self.shared.errors)
        if pending is not None and pending.runner is not None:
            pending.runner.deactivate()
        self.log.write("stop", frames=run.frames, reason=run.reason, served_round=run.served_round,
                       skipped=len(getattr(self.source, "skipped", [])), errors=run.errors)
        self.log.close()

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
