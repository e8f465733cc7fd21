"""The device loop's background worker: one adaptation round per job (continue GpreBN on the snapshot,
freeze, fold, export, gate), then persist and hand a passing candidate to the serving thread, or log the
failure and, after `recovery` failures in a row, restart adaptation from the serving checkpoint."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gprebn_edge.device.gates import RecoveryPolicy, evaluate_gates
from gprebn_edge.device.state import LoopState, MetricsLog, StateDir
from gprebn_edge.io import atomic_path
from gprebn_edge.runtime import metrics
from gprebn_edge.runtime.base import Runner
from gprebn_edge.runtime.loading import open_runner

if TYPE_CHECKING:
    from gprebn_edge.device.loop import LoopConfig

__all__ = ["Job", "Shared", "Stopped", "Worker", "WORKER_NICE", "one_line"]

WORKER_NICE = 10  # the worker thread's nice increment


@dataclass
class Job:
    round_id: int
    frames: np.ndarray
    served_frames: int


class Shared:
    """State the serving thread and the worker share, behind one lock."""

    def __init__(self, state: LoopState) -> None:
        self.lock = threading.Lock()
        self.state = state
        self.pending: tuple[Runner, int] | None = None   # a passed candidate waiting to be swapped in
        self.busy = False
        self.rounds = self.passed = self.rollbacks = 0
        self.errors: list[str] = []      # worker failures (start or round): reported, and the command fails at the end
        self.stop = threading.Event()    # set by the serving thread on Ctrl-C/SIGTERM: the round in flight is dropped


class Stopped(Exception):
    """The serving thread asked the worker to stop (raised between a round's phases)."""


class Worker:
    """Runs in the background thread; shares `shared` (behind its lock) with the serving thread."""

    def __init__(self, config: LoopConfig, state_dir: StateDir, shared: Shared, log: MetricsLog,
                 probe: tuple[np.ndarray, np.ndarray] | None, open_serving: Callable[[LoopState], Runner],
                 report: Callable[[str], None]) -> None:
        self.config = config
        self.dir = state_dir
        self.shared = shared
        self.log = log
        self.probe = probe
        self.open = open_serving
        self.report = report         # one line on stderr and in the log

    def fail(self, message: str, error: BaseException | None = None) -> None:
        if isinstance(error, OSError):  # a full disk fails every round alike: one line, not one per round
            message = (f"adaptation rounds cannot write under --state {self.dir.path} ({error.strerror or error}); "
                       "serving goes on with the current model")
        with self.shared.lock:
            self.shared.errors.append(message)
        self.report(message)

    def check_stop(self) -> None:
        if self.shared.stop.is_set():
            raise Stopped

    def run(self, jobs: queue.Queue[Job | None]) -> None:
        from gprebn_edge.device.readapt import ReadaptConfig, Readapter

        lower_priority()
        c = self.config
        with self.shared.lock:
            start_ckpt = self.dir.path / self.shared.state.checkpoint
        try:
            readapter = Readapter(start_ckpt, ReadaptConfig(batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                                                            threads=c.adapt_threads, consent=c.consent))
        except Exception as e:  # the loop keeps serving the current model; the command fails at the end
            self.fail(f"the adaptation worker failed to start ({one_line(e)}); serving goes on without adapting")
            return
        policy = RecoveryPolicy(max_failures=c.recovery)
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
            except Exception as e:  # never let a worker crash silently: report it, keep serving
                self.fail(f"adaptation round {job.round_id} failed ({one_line(e)})", e)
            finally:
                with self.shared.lock:
                    self.shared.busy = False

    def round(self, job: Job, readapter: Any, policy: RecoveryPolicy) -> None:
        c = self.config
        start = time.perf_counter()
        held = max(8, int(round(len(job.frames) * c.holdout)))
        adapt, holdout = job.frames[:-held], job.frames[-held:]
        with self.shared.lock:
            serving = replace(self.shared.state)
        files: list[Path] = []
        record: dict[str, Any] = {"round": job.round_id, "frames": job.served_frames, "buffer": len(job.frames),
                                  "holdout": held, "error": None}
        result = None
        candidate_runner: Runner | None = None
        failure: Exception | None = None
        try:
            self.check_stop()
            candidate = readapter.round(adapt)
            self.check_stop()
            record.update(steps=candidate.steps, stats_drift=candidate.stats_drift)
            onnx = self.dir.round_path(job.round_id, ".onnx")
            files += [onnx, onnx.with_name(onnx.stem + ".manifest.json")]
            from gprebn_edge.export.pipeline import export_model

            export_model(candidate.model, readapter.meta, onnx, [holdout], data="loop buffer (held-back frames)")
            self.check_stop()
            engine = None
            if serving.engine:
                engine = self.refit(serving, onnx, job.round_id)
                files.append(engine)
            candidate_runner = (open_runner(engine, "tensorrt") if engine else
                                open_runner(onnx, "onnxruntime", threads=self.config.serve_threads, shared_cpu=True))
            candidate_runner.activate()
            with self.open(serving) as current:
                cand_logits, cur_logits = candidate_runner.infer(holdout), current.infer(holdout)
                probe = None
                if self.probe is not None:
                    images, labels = self.probe
                    probe = (candidate_runner.infer(images), current.infer(images), labels)
            result = evaluate_gates(cand_logits, cur_logits, c.gates, probe=probe)
            record.update(passed=result.passed, reasons=result.reasons, gates=result.to_dict(),
                          mean_entropy=float(metrics.entropy(cand_logits).mean()))
        except Stopped:
            if candidate_runner is not None:
                candidate_runner.deactivate()
            for f in files:
                f.unlink(missing_ok=True)
            raise
        except Exception as e:
            record.update(passed=False, reasons=[f"error: {one_line(e)}"], gates=None, error=one_line(e))
            failure = e
        if failure is not None:
            self.fail(f"adaptation round {job.round_id} failed ({record['error']})", failure)
        record["seconds"] = round(time.perf_counter() - start, 3)
        with self.shared.lock:
            self.shared.rounds += 1
        self.log.write("round", **record)
        if record["passed"] and candidate_runner is not None:
            ckpt = self.dir.round_path(job.round_id, ".safetensors")
            readapter.save(candidate, ckpt, job.round_id, job.served_frames)
            with self.shared.lock:
                new = replace(self.shared.state, round=job.round_id, checkpoint=ckpt.name, onnx=files[0].name,
                              engine=files[2].name if len(files) > 2 else None, failures=0)
                self.dir.write(new)
                self.dir.clean(new)  # the previous round's files: state.json no longer names them
                self.shared.state = new
                self.shared.pending = (candidate_runner, job.round_id)
                self.shared.passed += 1
            readapter.accept(candidate)
            policy.record(True)
            return
        if candidate_runner is not None:
            candidate_runner.deactivate()
        for f in files:
            f.unlink(missing_ok=True)
        policy.record(False)
        with self.shared.lock:
            self.shared.state.failures = policy.consecutive_failures
            self.dir.write(self.shared.state)
            current_ckpt = self.dir.path / self.shared.state.checkpoint
        if policy.should_reset():
            readapter.reset_to(current_ckpt)
            self.log.write("rollback", to_round=serving.round, failures=policy.consecutive_failures,
                           frames=job.served_frames)
            policy.reset()
            with self.shared.lock:
                self.shared.rollbacks += 1
                self.shared.state.failures = 0
                self.dir.write(self.shared.state)

    def refit(self, serving: LoopState, onnx: Path, round_id: int) -> Path:
        from gprebn_edge.export.tensorrt_build import folded_weights, refit_engine

        assert serving.engine is not None
        refitted = refit_engine((self.dir.path / serving.engine).read_bytes(), folded_weights(onnx))
        out = self.dir.round_path(round_id, ".engine")
        with atomic_path(out) as tmp:
            tmp.write_bytes(refitted)
        return out


def lower_priority() -> None:
    """Give the calling (worker) thread a lower CPU priority than serving, where the OS allows it (Linux:
    a thread's nice value is per thread). Best effort: nothing happens elsewhere or without permission."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICE))
    except (AttributeError, OSError):
        pass


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:300]
