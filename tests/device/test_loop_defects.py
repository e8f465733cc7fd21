"""The device loop review's defects (issue 11), each with a test that fails on the code before its fix: an
engine's manifest travels into the state folder, a buffer too small to adapt is refused, the gates get the
source model's opinion, state.json is written outside the lock serving takes, frames are stacked on the
worker, a bug is not a rejected candidate, every runner is used on the thread that activated it, and a
detected shift starts a round (the log says why)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from deadline import call_with_deadline

from gprebn_edge.adaptation import AdaptConfig, adapt_to_file
from gprebn_edge.device.loop import LoopConfig, LoopResult, run_loop
from gprebn_edge.device.metrics_log import read_log
from gprebn_edge.device.state import LoopState, StateDir
from gprebn_edge.device.worker import Shared
from gprebn_edge.errors import InputError

STREAM = "stream:clean*60,gaussian_noise-5*140"
TIMEOUT = 90.0


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("defects") / "start.safetensors"
    adapt_to_file("builtin:small_resnet", "synthetic:clean:n=64", path, AdaptConfig(batch_size=32))
    return path


def _config(state: Path, start: Path | None, **kw) -> LoopConfig:
    base = {"state": state, "source": STREAM, "model": start, "every": 60, "buffer": 64, "min_frames": 48,
            "window": 50, "fps": 400.0}
    return LoopConfig(**{**base, **kw})


def _run(config: LoopConfig) -> LoopResult:
    return call_with_deadline(lambda: run_loop(config), TIMEOUT, "the loop")


def _rounds(result: LoopResult) -> list[dict]:
    return [r for r in read_log(result.log).records if r["event"] == "round"]


def test_an_engine_keeps_its_manifest_in_the_state_folder(tmp_path, start, monkeypatch):
    """--engine: the manifest beside it (preprocessing, classes) is copied with it, so the loop can start.
    TensorRT cannot run here: the 'engine' is an ONNX file that onnxruntime opens in its place."""
    from gprebn_edge.device import session as loop
    from gprebn_edge.export.pipeline import export_artifact

    export_artifact(start, tmp_path / "m.onnx", check_images=16)
    shutil.copyfile(tmp_path / "m.onnx", tmp_path / "m.engine")
    real_open = loop.open_runner

    def open_runner(path, backend="auto", **kw):
        return real_open(path, "onnxruntime" if backend == "tensorrt" else backend, verify=False)

    monkeypatch.setattr(loop, "open_runner", open_runner)
    result = _run(_config(tmp_path / "state", None, engine=tmp_path / "m.engine", max_frames=20, verify=False))
    assert result.frames == 20
    state = StateDir(tmp_path / "state").read()
    assert state is not None and state.engine == "round-000000.engine"
    assert (tmp_path / "state" / "round-000000.manifest.json").is_file()
    # and it survives the state folder's clean-up on a resume
    assert _run(_config(tmp_path / "state", None, engine=tmp_path / "m.engine", max_frames=30,
                        verify=False)).resumed
    assert (tmp_path / "state" / "round-000000.manifest.json").is_file()


def test_an_engine_without_its_manifest_is_refused_before_any_work(tmp_path, start):
    (tmp_path / "m.engine").write_bytes(b"not really an engine")
    with pytest.raises(InputError, match="manifest"):
        _run(_config(tmp_path / "state", None, engine=tmp_path / "m.engine", verify=False))
    assert not (tmp_path / "state").exists()


def test_a_buffer_smaller_than_a_round_is_refused(tmp_path, start):
    with pytest.raises(InputError, match="--buffer 32 holds fewer frames than a round needs"):
        _run(_config(tmp_path / "state", start, buffer=32))
    assert not (tmp_path / "state").exists()


def test_the_gates_get_the_source_model_and_the_input_shift(tmp_path, start, monkeypatch):
    from gprebn_edge.device import worker

    seen: list[dict] = []
    real = worker.evaluate_gates

    def spy(cand, cur, config=None, **kw):
        seen.append({"n": len(cand), **kw})
        return real(cand, cur, config, **kw)

    monkeypatch.setattr(worker, "evaluate_gates", spy)
    result = _run(_config(tmp_path / "state", start))
    assert result.rounds >= 1 and seen
    for call in seen:
        assert call["source_logits"] is not None and call["source_logits"].shape[0] == call["n"]
        shift = call["serving_input_shift"]
        assert shift is not None and np.isfinite(shift) and shift >= 0


def test_state_json_is_written_outside_the_lock_serving_takes(tmp_path):
    """A slow disk under state.json must not stall serving, which takes the shared lock on every frame."""
    state_dir = StateDir(tmp_path)
    shared = Shared(LoopState(round=0, checkpoint="", onnx="x.onnx"))
    real_write = state_dir.write
    writing = threading.Event()

    def slow_write(state):
        writing.set()
        time.sleep(0.5)
        real_write(state)

    state_dir.write = slow_write  # type: ignore[method-assign]
    t = threading.Thread(target=shared.persist, args=(state_dir,), daemon=True)
    t.start()
    assert writing.wait(5)
    t0 = time.monotonic()
    with shared.lock:
        waited = time.monotonic() - t0
    t.join(5)
    assert waited < 0.2, f"serving waited {waited:.2f} s for the lock while state.json was written"


def test_an_older_snapshot_never_replaces_a_newer_state_json(tmp_path):
    state_dir = StateDir(tmp_path)
    shared = Shared(LoopState(round=0, checkpoint="", onnx="x.onnx"))
    order: list[int] = []
    real_write = state_dir.write
    first = threading.Event()

    def write(state):
        order.append(state.frames)
        if state.frames == 1:  # the first writer is slow: the second, newer snapshot gets written first
            first.set()
            time.sleep(0.3)
        real_write(state)

    state_dir.write = write  # type: ignore[method-assign]
    shared.state.frames = 1
    t = threading.Thread(target=shared.persist, args=(state_dir,), daemon=True)
    t.start()
    assert first.wait(5)
    shared.state.frames = 2
    shared.persist(state_dir)
    t.join(5)
    assert order == [1, 2]  # both were written, the older first
    assert json.loads((tmp_path / "state.json").read_text())["frames"] == 2


def test_frames_are_stacked_on_the_worker_not_on_serving(tmp_path, start, monkeypatch):
    from gprebn_edge.device import worker

    jobs: list[object] = []
    left: list[int] = []
    real_round = worker.Worker.round

    def spy(self, job, readapter, policy):
        jobs.append(list(job.frames) if isinstance(job.frames, list) else job.frames)
        try:
            return real_round(self, job, readapter, policy)
        finally:
            left.append(len(job.frames))

    monkeypatch.setattr(worker.Worker, "round", spy)
    result = _run(_config(tmp_path / "state", start))
    assert result.rounds >= 1 and jobs
    assert all(isinstance(frames, list) and isinstance(frames[0], np.ndarray) for frames in jobs)
    assert left == [0] * len(jobs)  # once stacked, the job lets go of the frames the buffer drops meanwhile


def test_a_bug_in_a_round_is_an_error_not_a_rejected_candidate(tmp_path, start, monkeypatch):
    """Three crashing rounds in a row are reported as errors; they are not gate failures, so no rollback."""
    import gprebn_edge.device.readapt as readapt

    def broken(self, frames, **kw):
        raise AttributeError("a programming error")

    monkeypatch.setattr(readapt.Readapter, "round", broken)
    result = _run(_config(tmp_path / "state", start, source="stream:clean*300", every=50, recovery=2))
    rounds = _rounds(result)
    assert len(rounds) >= 3 and result.rollbacks == 0 and result.errors
    assert all(r["outcome"] == "error" and "a programming error" in r["error"] for r in rounds)
    assert all(r["reasons"] == [] for r in rounds)


def test_a_diverging_round_is_a_rejected_candidate(tmp_path, start, monkeypatch):
    import gprebn_edge.device.readapt as readapt

    def diverges(self, frames, **kw):
        raise readapt.Diverged("adaptation step 1 gave non-finite outputs")

    monkeypatch.setattr(readapt.Readapter, "round", diverges)
    result = _run(_config(tmp_path / "state", start, source="stream:clean*300", every=50, recovery=2))
    rounds = _rounds(result)
    assert len(rounds) >= 2 and result.rollbacks >= 1 and not result.errors
    assert all(r["outcome"] == "rejected" and r["reasons"][0].startswith("diverged") for r in rounds)


def test_every_thread_bound_runner_is_used_on_the_thread_that_activated_it(tmp_path, start, monkeypatch):
    """A candidate runner activated on the worker must not serve on the serving thread when it is bound to its
    thread (CUDA/TensorRT contexts): every infer runs on the thread that activated that runner. Here every
    onnxruntime runner is declared thread-bound, as a TensorRT one is."""
    from gprebn_edge.runtime.base import Runner
    from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner

    activated: dict[int, int] = {}
    misuse: list[str] = []
    real_init, real_activate, real_infer = OnnxRuntimeRunner.__init__, Runner.activate, Runner.infer

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        self.thread_affine = True

    def activate(self):
        activated[id(self)] = threading.get_ident()
        return real_activate(self)

    def infer(self, *a, **kw):
        if activated.get(id(self)) != threading.get_ident():
            misuse.append(threading.current_thread().name)
        return real_infer(self, *a, **kw)

    monkeypatch.setattr(OnnxRuntimeRunner, "__init__", init)
    monkeypatch.setattr(Runner, "activate", activate)
    monkeypatch.setattr(Runner, "infer", infer)
    result = _run(_config(tmp_path / "state", start, source="stream:clean*60,gaussian_noise-5*540", fps=300.0))
    assert result.swaps >= 1, "the test needs a swap"
    assert misuse == []


def test_a_cpu_candidate_is_handed_over_active_so_serving_never_opens_one(tmp_path, start, monkeypatch):
    """onnxruntime on the CPU may change threads: the worker's gated session serves as is, and the serving
    thread opens only the first model (no session creation stalls serving at a swap)."""
    from gprebn_edge.device import session as loop

    opened_by: list[str] = []
    real_open = loop.LoopSession._open

    def spy(self, state):
        opened_by.append(threading.current_thread().name)
        return real_open(self, state)

    monkeypatch.setattr(loop.LoopSession, "_open", spy)
    result = _run(_config(tmp_path / "state", start, source="stream:clean*60,gaussian_noise-5*540", fps=300.0))
    assert result.swaps >= 1 and not result.errors
    serving_opens = [name for name in opened_by if name != "gprebn-readapt"]
    assert len(serving_opens) == 1, opened_by  # the first model only; the worker opens the serving one to gate


def test_a_detected_shift_starts_a_round_and_the_log_says_why(tmp_path, start):
    """No round is due on the cadence (every 10,000 frames): the shift to noise starts one anyway."""
    result = _run(_config(tmp_path / "state", start, source="stream:clean*150,gaussian_noise-5*250", every=10_000))
    records = read_log(result.log).records
    shifts = [r for r in records if r["event"] == "shift"]
    rounds = _rounds(result)
    assert shifts and shifts[0]["frames"] > 150, shifts
    assert rounds and rounds[0]["trigger"].startswith("shift: "), rounds
    assert rounds[0]["buffer"] <= rounds[0]["frames"] - 150 + 64  # it adapts on the new domain's frames
    quiet = _run(_config(tmp_path / "quiet", start, source="stream:clean*150,gaussian_noise-5*250", every=10_000,
                         shift=None))
    assert _rounds(quiet) == []  # without the trigger, no round was due


def test_a_shift_after_a_swap_restarts_adaptation_without_errors(tmp_path, start):
    """A shift-triggered round restarts adaptation from the run's starting checkpoint, whose file the state
    folder deleted at the first swap: it is held in memory (this failed every such round before)."""
    result = _run(_config(tmp_path / "state", start, source="stream:clean*100,gaussian_noise-5*300,fog-5*300",
                          every=100, fps=300.0))
    rounds = _rounds(result)
    swaps = [r for r in read_log(result.log).records if r["event"] == "swap"]
    assert result.errors == [] and all(r["outcome"] != "error" for r in rounds), result.errors
    assert swaps and any(r["trigger"].startswith("shift") and r["frames"] > swaps[0]["frames"] for r in rounds)
