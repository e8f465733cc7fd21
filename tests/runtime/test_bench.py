"""benchmark(): statistics, iteration and duration modes, first call, warm-up, the stability warning and
the JSON file. A test double of the Runner interface advances a fake clock by scripted latencies, so the
timing logic is checked exactly; a real ONNX model checks it end to end."""

import json
import time

import numpy as np
import pytest
from rich.console import Console

from gprebn_edge.errors import InputError
from gprebn_edge.runtime import bench
from gprebn_edge.runtime.base import Runner, RunnerInfo, TensorInfo
from gprebn_edge.runtime.bench import BenchResult, benchmark, format_table, latency_stats, read_json, write_json
from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedLatencyRunner(Runner):
    """Each infer() takes the next scripted latency (ms, cycled) on the fake clock; activate takes 50 ms."""

    name = "scripted"

    def __init__(self, clock: FakeClock, script_ms: list[float], shape=("batch", 3, 8, 8)) -> None:
        super().__init__()
        self.clock, self.script, self.shape = clock, script_ms, shape
        self.calls: list[np.ndarray] = []

    def _activate(self) -> None:
        self.clock.now += 0.05

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        self.clock.now += self.script[len(self.calls) % len(self.script)] / 1e3
        self.calls.append(batch)
        return np.zeros((len(batch), 2), np.float32)

    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo("input", self.shape, "float32")]

    def outputs(self) -> list[TensorInfo]:
        return [TensorInfo("logits", ("batch", 2), "float32")]

    def info(self) -> RunnerInfo:
        return RunnerInfo("scripted", "cpu")


@pytest.fixture()
def clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    return clock


def test_scripted_latencies_are_measured_exactly(clock):
    # first call 9 ms, 3 warm-up calls, then 2, 4, 2, 4, ... ms
    runner = ScriptedLatencyRunner(clock, [9, 2, 4, 2] + [4, 2] * 100)
    r = benchmark(runner, batch=4, warmup=3, iters=100, environment=False)
    assert not runner.active and len(runner.calls) == 1 + 3 + 100
    assert r.first_call_ms == pytest.approx(9) and r.first_call_cold and r.activate_ms == pytest.approx(50)
    assert r.iterations == len(r.latencies_ms) == 100 and r.warmup_iterations == 3
    assert r.latencies_ms == pytest.approx([4, 2] * 50)
    assert r.stats["mean"] == pytest.approx(3) and r.stats["std"] == pytest.approx(1)
    assert (r.stats["min"], r.stats["max"]) == pytest.approx((2, 4))
    assert r.stats == pytest.approx(latency_stats([4, 2] * 50))
    assert r.throughput == pytest.approx(4 / 3e-3)
    assert r.input_shape == [4, 3, 8, 8] and runner.calls[0].shape == (4, 3, 8, 8)
    assert r.cv == pytest.approx(1 / 3) and r.warnings == [
        "unstable: CV 33.3% > 10% (latency varies between iterations: check other load, power mode and clocks, "
        "e.g. jetson_clocks; run longer)"]


def test_stable_runs_have_no_warning_and_few_iterations_do(clock):
    assert benchmark(ScriptedLatencyRunner(clock, [5, 5.2, 4.9, 5.1]), iters=50, environment=False).warnings == []
    few = benchmark(ScriptedLatencyRunner(clock, [5]), iters=5, environment=False)
    assert len(few.warnings) == 1 and "only 5 timed iterations" in few.warnings[0]
    assert benchmark(ScriptedLatencyRunner(clock, [1, 1.25]), iters=40, cv_limit=0.2, environment=False).warnings \
        == []


def test_duration_and_warmup_seconds(clock):
    runner = ScriptedLatencyRunner(clock, [2])
    calls = []
    r = benchmark(runner, warmup=1, warmup_seconds=0.02, duration=0.05, environment=False,
                  progress=lambda done, total: calls.append((done, total)))
    # 20 ms of 2 ms calls, then stop at the first call that reaches 50 ms (one more where float rounding
    # leaves the sum a hair short)
    assert r.warmup_iterations in (10, 11) and r.iterations in (25, 26)
    assert calls[-1] == (50, 50) and all(total == 50 for _, total in calls)


def test_latency_percentiles_are_ordered():
    s = latency_stats(np.random.default_rng(0).lognormal(size=1000))
    assert s["min"] <= s["p50"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"]
    with pytest.raises(InputError):
        latency_stats([])


def test_real_onnx_model(exported, tmp_path):
    calls = []
    r = benchmark(OnnxRuntimeRunner(exported.onnx, threads=1), batch=2, warmup=3, iters=30, seed=1,
                  progress=lambda done, total: calls.append((done, total)))
    assert r.iterations == len(r.latencies_ms) == 30 and calls[-1] == (30, 30)
    assert r.stats["min"] <= r.stats["p50"] <= r.stats["p99"] <= r.stats["max"] and r.first_call_ms > 0
    assert r.throughput == pytest.approx(2e3 / r.stats["mean"])
    assert r.peak_host_memory_mb > 10 and r.peak_device_memory_mb is None
    assert r.runner["backend"] == "onnxruntime" and r.runner["details"]["threads"] == 1
    assert r.environment["runner"] == r.runner and r.environment["versions"]["onnxruntime"]

    path = tmp_path / "bench.json"
    assert write_json(r, path) == path
    assert json.loads(path.read_text()) == r.to_dict()
    assert read_json(path) == r
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left behind


def test_duration_mode_stops_near_the_duration(exported):
    with OnnxRuntimeRunner(exported.onnx) as runner:  # already active: stays active, first call is warm
        start = time.perf_counter()
        r = benchmark(runner, duration=0.3, warmup=2, environment=False)
        elapsed = time.perf_counter() - start
        assert runner.active and not r.first_call_cold and r.activate_ms is None
    assert 0.3 <= elapsed < 1.0 and sum(r.latencies_ms) <= 1e3 * elapsed
    assert r.iterations > 10


def test_real_inputs_are_cycled(clock, exported):
    runner = ScriptedLatencyRunner(clock, [1], shape=("batch", 3, 32, 32))
    r = benchmark(runner, batch=8, warmup=0, iters=8, inputs=exported.images, environment=False)
    assert r.real_inputs and len(runner.calls) == 9
    np.testing.assert_array_equal(runner.calls[1], exported.images[:8])
    np.testing.assert_array_equal(runner.calls[5], exported.images[:8])  # 4 batches in 32 images, cycled
    np.testing.assert_array_equal(runner.calls[3], exported.images[16:24])
    with pytest.raises(InputError, match="at least 64 images"):
        benchmark(runner, batch=64, iters=1, inputs=exported.images, environment=False)
    bad = exported.images.copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        benchmark(runner, iters=1, inputs=bad, environment=False)


def test_bad_requests(clock):
    runner = ScriptedLatencyRunner(clock, [1])
    with pytest.raises(InputError, match="not both"):
        benchmark(runner, iters=10, duration=1.0)
    with pytest.raises(InputError, match="at least one iteration"):
        benchmark(runner, iters=0)
    with pytest.raises(InputError, match="batch"):
        benchmark(runner, batch=0)
    dynamic = ScriptedLatencyRunner(clock, [1], shape=("batch", 3, None, None))
    with pytest.raises(InputError, match=r"give the per-image input shape with --input-shape C,H,W"):
        benchmark(dynamic, iters=1, environment=False)
    assert not dynamic.active  # deactivated after the failure
    assert benchmark(dynamic, iters=1, input_shape=(3, 16, 16), environment=False).input_shape == [1, 3, 16, 16]
    fixed = ScriptedLatencyRunner(clock, [1], shape=(4, 3, 8, 8))
    with pytest.raises(InputError, match="fixed at 4"):
        benchmark(fixed, batch=2, iters=1, environment=False)


def test_table(clock):
    r = benchmark(ScriptedLatencyRunner(clock, [1, 3]), iters=20, environment=False)
    console = Console(record=True, width=200)
    console.print(format_table(r))
    text = console.export_text()
    for needle in ("first call", "p50", "p99", "throughput", "500.0 images/s", "unstable: CV 50.0%"):
        assert needle in text
    assert BenchResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r
