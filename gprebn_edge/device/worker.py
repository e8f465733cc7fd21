"""The device loop's background worker: one adaptation round per job (continue GpreBN on the snapshot,
freeze, fold, export, gate), then persist and hand a passing candidate to the serving thread, or log the
failure and, after `recovery` failures in a row, restart adaptation from the serving checkpoint.

A failed round also checks what serves: when the serving model (a round since the start) answers far fewer
classes than the unadapted model on the round's held-back frames (gates.serving_worse), the start model
(round 0) is gated there like a candidate and, if it passes, serves again ("fallback"): a broken candidate
that slipped through a small slice does not serve every domain after it."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gprebn_edge.budget import BudgetError
from gprebn_edge.device.config import RUNNER_BATCH
from gprebn_edge.device.gates import GateResult, RecoveryPolicy, evaluate_gates, serving_worse
from gprebn_edge.device.metrics_log import MetricsLog
from gprebn_edge.device.state import LoopState, StateDir
from gprebn_edge.device.stop import Stopped, StopToken
from gprebn_edge.io import atomic_path
from gprebn_edge.runtime import metrics
from gprebn_edge.runtime.base import Runner
from gprebn_edge.runtime.loading import manifest_beside, open_runner
from gprebn_edge.validate import oneline

if TYPE_CHECKING:  # torch: imported by the worker thread only when it adapts
    from gprebn_edge.device.config import LoopConfig
    from gprebn_edge.device.readapt import Candidate, Readapter

__all__ = ["Job", "Pending", "RoundFiles", "Shared", "Worker", "WORKER_NICE", "describe"]

WORKER_NICE = 10  # the worker thread's nice increment

@dataclass
class Job:
    round_id: int
    frames: list[np.ndarray]   # the buffer's frames, in stream order (stacked on the worker, not on serving)
    served_frames: int
    trigger: str = "cadence"   # why the round started (the metrics log records it)


@dataclass(frozen=True)
class Pending:
    """A candidate that passed and was persisted: the serving thread opens it (on its own thread) and swaps.
    reference: the held-back frames it was gated on and its logits there (the shift detector's new reference)."""

    state: LoopState
    reference: tuple[np.ndarray, np.ndarray] | None = None
    runner: Runner | None = None  # already active, when it may change threads (not thread-affine): no open stall


class Shared:
    """State the serving thread and the worker share, behind one lock. state.json is written outside it."""

    def __init__(self, state: LoopState, stop: StopToken | None = None) -> None:
        self.lock = threading.Lock()
        self.state = state
        self.pending: Pending | None = None   # a passed candidate waiting to be swapped in
        self.busy = False
        self.rounds = self.passed = self.rollbacks = self.fallbacks = 0
        self.last_round: dict[str, Any] | None = None  # the last round's log record: what it decided and why
        self.errors: list[str] = []      # worker failures (start or round): reported, and the command fails at the end
        self.stop = stop or StopToken()  # the loop's stop request: the worker drops the round in flight
        self._write_lock = threading.Lock()
        self._version = self._written = 0

    def persist(self, state_dir: StateDir) -> None:
        """Write state.json with the state as it is now. The fsync happens outside `lock`, so serving never
        waits on the disk; writes are ordered by version, so an older snapshot never replaces a newer one."""
        with self.lock:
            self._version += 1
            version, snapshot = self._version, replace(self.state)
        with self._write_lock:
            if version > self._written:
                state_dir.write(snapshot)
                self._written = version


@dataclass
class RoundFiles:
    """A candidate's files in the state folder, as far as they were written."""

    onnx: Path | None = None
    manifest: Path | None = None
    engine: Path | None = None   # a refit of the serving engine (TensorRT serves)

    def discard(self) -> None:
        for f in (self.onnx, self.manifest, self.engine):
            if f is not None:
                f.unlink(missing_ok=True)


@dataclass
class _Outcome:
    """One round's result: passed, rejected by its gates (or diverged), or an error (a bug, a full disk)."""

    record: dict[str, Any]
    files: RoundFiles = field(default_factory=RoundFiles)
    candidate: Candidate | None = None
    error: Exception | None = None
    reference: tuple[np.ndarray, np.ndarray] | None = None  # held-back frames and the candidate's logits there
    runner: Runner | None = None  # the gated candidate's runner, kept active to hand over (not thread-affine)
    gates: GateResult | None = None
    serving_logits: np.ndarray | None = None  # on the held-back frames, as the gates saw them
    source_logits: np.ndarray | None = None
    input_shift: float | None = None

    @property
    def passed(self) -> bool:
        return bool(self.record.get("passed"))


class Worker:
    """Runs in the background thread; shares `shared` (behind its lock) with the serving thread."""

    def __init__(self, config: LoopConfig, state_dir: StateDir, shared: Shared, log: MetricsLog,
                 probe: tuple[np.ndarray, np.ndarray] | None, open_serving: Callable[[LoopState], Runner],
                 report: Callable[..., None], publish: Callable[[LoopState], None] | None = None) -> None:
        self.config = config
        self.dir = state_dir
        self.shared = shared
        self.log = log
        self.probe = probe
        self.open = open_serving
        self.report = report         # report(message, event="error"): one line on stderr and in the log
        self.publish = publish       # a passed candidate, once persisted, to the model repository (--publish)

    def fail(self, message: str, error: BaseException | None = None) -> None:
        if isinstance(error, OSError):  # a full disk fails every round alike: one line, not one per round
            message = (f"adaptation rounds cannot write under --state {self.dir.path} ({error.strerror or error}); "
                       "serving goes on with the current model")
        with self.shared.lock:
            self.shared.errors.append(message)
        self.report(message)

    def run(self, jobs: queue.Queue[Job | None]) -> None:
        from gprebn_edge.device.readapt import ReadaptConfig, Readapter

        lower_priority()
        c = self.config
        with self.shared.lock:
            start_ckpt = self.dir.path / self.shared.state.checkpoint
        try:
            readapter = Readapter(start_ckpt, ReadaptConfig(batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                                                            threads=c.adapt_threads, consent=c.consent,
                                                            max_memory=c.max_memory, buffer=c.buffer))
        except Exception as e:  # the loop keeps serving the current model; the command fails at the end
            self.fail(f"the adaptation worker failed to start ({describe(e)}); serving goes on without adapting")
            return
        policy = RecoveryPolicy(max_failures=c.recovery)
        try:
            while not self.shared.stop.is_set():
                try:
                    job = jobs.get(timeout=0.1)
                except queue.Empty:
                    continue
                if job is None:
                    return
                try:
                    self.round(job, readapter, policy)
                except Stopped:
                    return
                except BudgetError as e:  # every round would fail alike: stop adapting, keep serving
                    self.fail(f"{oneline(e)}; serving goes on without adapting")
                    return
                except Exception as e:  # never let a worker crash silently: report it, keep serving
                    self.fail(f"adaptation round {job.round_id} failed ({describe(e)})", e)
                finally:
                    with self.shared.lock:
                        self.shared.busy = False
        finally:
            readapter.close()

    def round(self, job: Job, readapter: Readapter, policy: RecoveryPolicy) -> None:
        start = time.perf_counter()
        with self.shared.lock:
            serving = replace(self.shared.state)
        outcome = self._try_candidate(job, readapter, serving)
        try:
            outcome.record["seconds"] = round(time.perf_counter() - start, 3)
            with self.shared.lock:
                self.shared.rounds += 1
                self.shared.last_round = dict(outcome.record)
            self.log.write("round", **outcome.record)
            if outcome.error is not None:  # a bug or a full disk, not a verdict on the candidate: no rollback count
                outcome.files.discard()
                self.fail(f"adaptation round {job.round_id} failed ({outcome.record['error']})", outcome.error)
            elif outcome.passed:
                self._accept(job, readapter, outcome)
                policy.record(True)
            else:
                outcome.files.discard()
                if not self._fall_back(job, readapter, policy, serving, outcome):
                    self._reject(job, readapter, policy, serving)
        finally:
            if outcome.runner is not None:  # not handed over to serving
                outcome.runner.deactivate()

    def _try_candidate(self, job: Job, readapter: Readapter, serving: LoopState) -> _Outcome:
        """Adapt, freeze, export (parity-checked) and gate one candidate; Stopped drops it, files and all."""
        from gprebn_edge.device.readapt import Diverged

        c = self.config
        frames = np.stack(job.frames)
        job.frames.clear()  # the frames that leave the buffer during the round are freed, not kept to its end
        # enough held-back frames for the gates to tell a candidate from chance (48), but never over half
        held = max(min(48, len(frames) // 2), int(round(len(frames) * c.holdout)))
        adapt, holdout = frames[:-held], frames[-held:]
        record: dict[str, Any] = {"round": job.round_id, "frames": job.served_frames, "buffer": len(frames),
                                  "holdout": held, "trigger": job.trigger, "outcome": None, "error": None}
        outcome = _Outcome(record)
        stop = self.shared.stop
        try:
            stop.check()
            if job.trigger.startswith("shift:"):  # a new domain: adapt from the start, not from the old domain
                readapter.restart()
            outcome.candidate = candidate = readapter.round(adapt, stop=stop)
            stop.check()
            record.update(steps=candidate.steps, stats_drift=candidate.stats_drift)
            if readapter.plan is not None:
                record["memory_plan"] = readapter.plan.describe()
            self._export(candidate, readapter, holdout, serving, job.round_id, outcome.files)
            stop.check()
            result, cand_logits = self._gate(outcome.files, holdout, readapter, serving, outcome)
            outcome.gates = result
            record.update(passed=result.passed, reasons=result.reasons, gates=result.to_dict(),
                          mean_entropy=float(metrics.entropy(cand_logits).mean()),
                          outcome="passed" if result.passed else "rejected")
            outcome.reference = (holdout, cand_logits)
        except (Stopped, BudgetError):
            outcome.files.discard()
            if outcome.runner is not None:
                outcome.runner.deactivate()
            raise
        except Diverged as e:  # the adaptation itself blew up: a verdict on this candidate, counted as a failure
            record.update(passed=False, reasons=[f"diverged: {e}"], gates=None, outcome="rejected")
        except Exception as e:
            record.update(passed=False, reasons=[], gates=None, error=describe(e), outcome="error")
            outcome.error = e
        return outcome

    def _export(self, candidate: Candidate, readapter: Readapter, holdout: np.ndarray, serving: LoopState,
                round_id: int, files: RoundFiles) -> None:
        from gprebn_edge.export.pipeline import export_model

        files.onnx = self.dir.round_path(round_id, ".onnx")
        files.manifest = manifest_beside(files.onnx)
        export_model(candidate.model, readapter.meta, files.onnx, _chunks(holdout, RUNNER_BATCH),
                     data="loop buffer (held-back frames)")
        if serving.engine:
            self.shared.stop.check()
            files.engine = self.refit(serving, files.onnx, round_id)

    def _gate(self, files: RoundFiles, holdout: np.ndarray, readapter: Readapter, serving: LoopState,
              outcome: _Outcome) -> tuple[GateResult, np.ndarray]:
        """The candidate's, the serving model's and the source model's logits on the held-back frames (and the
        probe), then the gates. A runner bound to its thread is opened, used and closed here; one that is not
        is kept active in `outcome.runner`, so that serving takes it over without opening it again."""
        assert files.onnx is not None
        candidate = (open_runner(files.engine, "tensorrt") if files.engine else
                     open_runner(files.onnx, "onnxruntime", threads=self.config.serve_threads, shared_cpu=True))
        candidate.activate()
        try:
            n = RUNNER_BATCH
            with self.open(serving) as current:
                cand_logits, cur_logits = _infer(candidate, holdout, n), _infer(current, holdout, n)
                probe = None
                if self.probe is not None:
                    images, labels = self.probe
                    probe = (_infer(candidate, images, n), _infer(current, images, n), labels)
        finally:
            if candidate.thread_affine:
                candidate.deactivate()
            else:
                outcome.runner = candidate
        self.shared.stop.check()
        source_logits = readapter.source_logits(holdout)
        shift = readapter.input_shift(holdout)
        outcome.serving_logits, outcome.source_logits, outcome.input_shift = cur_logits, source_logits, shift
        result = evaluate_gates(cand_logits, cur_logits, self.config.gates, probe=probe, source_logits=source_logits,
                                serving_input_shift=shift)
        return result, cand_logits

    def _accept(self, job: Job, readapter: Readapter, outcome: _Outcome) -> None:
        ckpt = self.dir.round_path(job.round_id, ".safetensors")
        onnx = outcome.files.onnx
        assert outcome.candidate is not None and onnx is not None
        readapter.save(outcome.candidate, ckpt, job.round_id, job.served_frames)
        files = outcome.files
        with self.shared.lock:
            new = replace(self.shared.state, round=job.round_id, checkpoint=ckpt.name, onnx=onnx.name,
                          engine=files.engine.name if files.engine else None, failures=0)
            self.shared.state = new
        self.shared.persist(self.dir)
        self.dir.clean(new)  # the previous round's files: state.json no longer names them
        with self.shared.lock:
            superseded, self.shared.pending = self.shared.pending, Pending(replace(new), outcome.reference,
                                                                           outcome.runner)
            outcome.runner = None  # serving's now
            self.shared.passed += 1
        if superseded is not None and superseded.runner is not None:  # never swapped in: close it here
            superseded.runner.deactivate()
        readapter.accept(outcome.candidate)
        if self.publish is not None:  # gated and persisted: it serves from the next frame on
            self.publish(new)

    def _fall_back(self, job: Job, readapter: Readapter, policy: RecoveryPolicy, serving: LoopState,
                   outcome: _Outcome) -> bool:
        """After a rejected candidate: serve the start model again when the serving model is less diverse than
        the unadapted one on the held-back frames (gates.serving_worse) and the start model, gated there like
        a candidate, passes. Returns whether it fell back."""
        result, held = outcome.gates, None if outcome.reference is None else outcome.reference[0]
        if serving.round == 0 or result is None or held is None or outcome.serving_logits is None or \
                self.probe is not None:
            return False  # with a labeled probe, the probe decides what serves, not diversity
        why = serving_worse(result, self.config.gates)
        start = self.dir.start_state() if why is not None else None
        if why is None or start is None:
            return False
        self.shared.stop.check()
        runner = (open_runner(self.dir.path / start.engine, "tensorrt") if start.engine else
                  open_runner(self.dir.path / start.onnx, "onnxruntime", threads=self.config.serve_threads,
                              shared_cpu=True))
        runner.activate()
        handed = False
        try:
            start_logits = _infer(runner, held, RUNNER_BATCH)
            gated = evaluate_gates(start_logits, outcome.serving_logits, self.config.gates,
                                   source_logits=outcome.source_logits, serving_input_shift=outcome.input_shift)
            self.log.write("fallback_check", round=job.round_id, frames=job.served_frames, from_round=serving.round,
                           reason=why, passed=gated.passed, reasons=gated.reasons)
            if not gated.passed:
                return False
            with self.shared.lock:
                new = replace(self.shared.state, round=0, checkpoint=start.checkpoint, onnx=start.onnx,
                              engine=start.engine, failures=0)
                self.shared.state = new
            self.shared.persist(self.dir)
            self.dir.clean(new)
            readapter.reset_to(self.dir.path / start.checkpoint)
            policy.reset()
            self.log.write("fallback", from_round=serving.round, to_round=0, frames=job.served_frames, reason=why)
            self.report(f"round {serving.round} served worse than the unadapted model ({why}); serving the start "
                        f"model (round 0) again", "notice")
            with self.shared.lock:
                superseded, self.shared.pending = self.shared.pending, Pending(
                    replace(new), (held, start_logits), None if runner.thread_affine else runner)
                self.shared.fallbacks += 1
            handed = not runner.thread_affine
            if superseded is not None and superseded.runner is not None:
                superseded.runner.deactivate()
            if self.publish is not None:
                self.publish(new)
            return True
        finally:
            if not handed:
                runner.deactivate()

    def _reject(self, job: Job, readapter: Readapter, policy: RecoveryPolicy, serving: LoopState) -> None:
        policy.record(False)
        with self.shared.lock:
            self.shared.state.failures = policy.consecutive_failures
            current_ckpt = self.dir.path / self.shared.state.checkpoint
        self.shared.persist(self.dir)
        if not policy.should_reset():
            return
        readapter.reset_to(current_ckpt)
        self.log.write("rollback", to_round=serving.round, failures=policy.consecutive_failures,
                       frames=job.served_frames)
        policy.reset()
        with self.shared.lock:
            self.shared.rollbacks += 1
            self.shared.state.failures = 0
        self.shared.persist(self.dir)

    def refit(self, serving: LoopState, onnx: Path, round_id: int) -> Path:
        from gprebn_edge.export.tensorrt_build import folded_weights, refit_engine

        assert serving.engine is not None
        refitted = refit_engine((self.dir.path / serving.engine).read_bytes(), folded_weights(onnx))
        out = self.dir.round_path(round_id, ".engine")
        with atomic_path(out) as tmp:
            tmp.write_bytes(refitted)
        return out


def _chunks(x: np.ndarray, n: int) -> list[np.ndarray]:
    """`x` in batches of at most `n` frames: what a forward without gradients may take."""
    return [x[i:i + n] for i in range(0, len(x), n)]


def _infer(runner: Runner, x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([runner.infer(c) for c in _chunks(x, n)])


def lower_priority() -> None:
    """Give the calling (worker) thread a lower CPU priority than serving, where the OS allows it (Linux:
    a thread's nice value is per thread). Best effort: nothing happens elsewhere or without permission."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICE))
    except (AttributeError, OSError):
        pass


def describe(e: BaseException) -> str:
    """An exception as one line with its type: a worker failure may be a bug, whose type matters."""
    return f"{type(e).__name__}: {oneline(e, 280)}"
