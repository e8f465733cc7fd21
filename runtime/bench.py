"""Latency benchmark of one runner (timm's benchmark.py / trtexec in spirit): first-call latency apart,
warm-up, then synchronized per-iteration timing, percentiles, throughput, stability warning, peak memory
and the environment. numpy only; torch is consulted for GPU memory only where it is already imported."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from gprebn_edge.errors import InputError
from gprebn_edge.io import write_text_atomic
from gprebn_edge.runtime.base import Runner
from gprebn_edge.runtime.environment import describe_environment, memory_available, peak_resident_memory
from gprebn_edge.runtime.metrics import latency_summary
from gprebn_edge.validate import flag_number

__all__ = ["BenchResult", "benchmark", "time_interleaved", "latency_stats", "write_json", "read_json", "format_table",
           "CV_LIMIT", "DEFAULT_ITERS"]

CV_LIMIT = 0.10        # trtexec flags a run whose coefficient of variation exceeds 10 %
DEFAULT_ITERS = 200
PERCENTILES = (50, 90, 95, 99)

Progress = Callable[[int, int], None]  # (done, total): iterations, or milliseconds in duration mode


@dataclass
class BenchResult:
    """One benchmark run. Latencies are in milliseconds; throughput in images per second."""

    batch: int
    input_shape: list[int]
    iterations: int
    warmup_iterations: int
    first_call_ms: float
    first_call_cold: bool           # the first call after activate (False: the runner was already warm)
    activate_ms: float | None       # loading the model, when the benchmark activated the runner
    latencies_ms: list[float]
    stats: dict[str, float]         # p50, p90, p95, p99, mean, std, min, max (ms), n
    throughput: float
    cv: float
    warnings: list[str]
    peak_host_memory_mb: float | None
    peak_device_memory_mb: float | None
    runner: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)
    real_inputs: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def label(self) -> str:
        r = self.runner
        return f"{r.get('backend', '?')} {r.get('device', '?')} {r.get('precision', '')} b{self.batch}".strip()


def latency_stats(latencies_ms: list[float] | np.ndarray) -> dict[str, float]:
    """Percentiles (linear interpolation), mean, population std, min, max and count of latencies in ms:
    metrics.latency_summary at PERCENTILES."""
    return latency_summary(latencies_ms, PERCENTILES)


def _peak_host_mb() -> float | None:
    """Peak resident memory of this process so far, in MiB."""
    peak = peak_resident_memory()
    return None if peak is None else round(peak / 2**20, 1)


def _torch_cuda_for(runner: Runner) -> Any:
    """torch, when the runner is the torch backend on CUDA (then its allocator sees all the memory)."""
    torch = sys.modules.get("torch")
    info = runner.info()
    if torch is None or info.backend != "torch" or not info.device.startswith("cuda"):
        return None
    return torch


def _input_shape(runner: Runner, batch: int, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return (batch, *(int(d) for d in input_shape))
    declared = runner.inputs()[0]
    dims = declared.shape[1:]
    if not all(isinstance(d, int) for d in dims):
        raise InputError(f"the model's input {declared.name!r} has shape {list(declared.shape)}, with sizes only "
                         "known at run time: give the per-image input shape with --input-shape C,H,W (e.g. 3,224,224)")
    first = declared.shape[0] if declared.shape else None
    if isinstance(first, int) and first != batch:
        raise InputError(f"the model's batch size is fixed at {first}: benchmark it with batch {first}")
    return (batch, *(int(d) for d in dims if isinstance(d, int)))


def check_input_size(shape: tuple[int, ...], limit: int | None = None) -> None:
    """InputError, before anything is allocated, for a float32 input batch of `shape` that cannot fit: more
    than half of the memory this machine has available (`limit` bytes where given)."""
    if any(d < 1 for d in shape):
        raise InputError(f"the input shape {list(shape)} has a size below 1: give positive sizes (--batch, "
                         "--input-shape C,H,W)")
    need = 4 * math.prod(shape)
    available = memory_available()
    limit = limit if limit is not None else (available // 2 if available is not None else None)
    if limit is not None and need > limit:
        raise InputError(f"an input batch of shape {list(shape)} needs {_size(need)} of float32, more than half of "
                         f"the {_size(2 * limit)} of memory available here: lower --batch or --input-shape (or "
                         "export the model at its real input size)")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _batches(inputs: np.ndarray | None, shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    if inputs is None:
        check_input_size(shape)
        return [np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)]
    x = np.asarray(inputs, dtype=np.float32)
    batch = shape[0]
    if x.ndim != len(shape) or x.shape[0] < batch:
        raise InputError(f"benchmark inputs must be an array of at least {batch} images of shape "
                         f"{list(shape[1:])}, got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise InputError("benchmark inputs contain NaN or infinite values")
    return [np.ascontiguousarray(x[i:i + batch]) for i in range(0, x.shape[0] - batch + 1, batch)]


def _warnings(stats: dict[str, float], cv: float, iterations: int, cv_limit: float) -> list[str]:
    out = []
    if cv > cv_limit:
        out.append(f"unstable: CV {100 * cv:.1f}% > {100 * cv_limit:.0f}% (latency varies between iterations: "
                   "check other load, power mode and clocks, e.g. jetson_clocks; run longer)")
    if iterations < 20:
        out.append(f"only {iterations} timed iterations: the tail percentiles are rough")
    return out


def benchmark(runner: Runner, *, batch: int = 1, warmup: int = 10, warmup_seconds: float | None = None,
              iters: int | None = None, duration: float | None = None, inputs: np.ndarray | None = None,
              input_shape: tuple[int, ...] | None = None, seed: int = 0, progress: Progress | None = None,
              cv_limit: float = CV_LIMIT, environment: bool = True) -> BenchResult:
    """Time `runner.infer` on batches of `batch` images. Activates the runner if it is not active (and then
    reports the load time and a cold first call), warms up for `warmup` iterations and at least
    `warmup_seconds`, then times `iters` iterations (default 200) or as many as fit in `duration` seconds.
    Inputs are seeded random float32 of the model's input shape (`input_shape` (C, H, W) where it is not
    fixed), or the images of `inputs` (N, C, H, W), cycled."""
    iters = _check_request(batch, warmup, warmup_seconds, iters, duration)
    owned = not runner.active
    activate_ms = None
    if owned:
        start = time.perf_counter()
        runner.activate()
        activate_ms = 1e3 * (time.perf_counter() - start)
    try:
        shape = _input_shape(runner, batch, input_shape)
        batches = _batches(inputs, shape, seed)
        torch = _torch_cuda_for(runner)
        if torch is not None:
            torch.cuda.reset_peak_memory_stats()

        start = time.perf_counter()
        try:
            first = runner.infer(batches[0])
        except MemoryError:
            raise InputError(f"out of memory running the model on an input batch of shape {list(shape)}: lower "
                             "--batch or --input-shape") from None
        first_ms = 1e3 * (time.perf_counter() - start)
        if not np.isfinite(np.asarray(first, dtype=np.float64)).all():
            raise InputError(f"the model's outputs are not finite (NaN or Inf) on an input batch of shape "
                             f"{list(shape)}: the latency of a broken model is not a result; check its weights "
                             "(gprebn-edge info) or re-export it")
        warmup_done = _warm_up(runner, batches, warmup, warmup_seconds)
        latencies = _timed(runner, batches, iters, duration, progress)

        peak_device = round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch is not None else None
        info = runner.info()
        if peak_device is None and "device_memory_bytes" in info.details:
            peak_device = round(int(info.details["device_memory_bytes"]) / 2**20, 1)
    finally:
        if owned:
            runner.deactivate()

    stats = latency_stats(latencies)
    cv = stats["std"] / stats["mean"] if stats["mean"] > 0 else 0.0
    return BenchResult(
        batch=batch, input_shape=list(shape), iterations=len(latencies), warmup_iterations=warmup_done,
        first_call_ms=first_ms, first_call_cold=owned, activate_ms=activate_ms, latencies_ms=latencies,
        stats=stats, throughput=batch / (stats["mean"] / 1e3) if stats["mean"] > 0 else float("inf"), cv=cv,
        warnings=_warnings(stats, cv, len(latencies), cv_limit), peak_host_memory_mb=_peak_host_mb(),
        peak_device_memory_mb=peak_device, runner=asdict(info),
        environment=describe_environment(info) if environment else {}, real_inputs=inputs is not None)


def _check_request(batch: int, warmup: int, warmup_seconds: float | None, iters: int | None,
                   duration: float | None) -> int | None:
    """The number of iterations to time (None in duration mode); InputError for a request that makes no sense."""
    flag_number(batch, "--batch", low=1)
    if iters is not None and duration is not None:
        raise InputError("give either a number of iterations or a duration, not both")
    if iters is None and duration is None:
        iters = DEFAULT_ITERS
    if (iters is not None and iters < 1) or (duration is not None and duration <= 0):
        raise InputError("the benchmark needs at least one iteration (a positive iters or duration)")
    if warmup < 0 or (warmup_seconds is not None and warmup_seconds < 0):
        raise InputError("warm-up cannot be negative")
    return iters


def _warm_up(runner: Runner, batches: list[np.ndarray], warmup: int, warmup_seconds: float | None) -> int:
    """At least `warmup` calls and `warmup_seconds`; the number of calls made."""
    done = 0
    start = time.perf_counter()
    while done < warmup or (warmup_seconds is not None and time.perf_counter() - start < warmup_seconds):
        runner.infer(batches[done % len(batches)])
        done += 1
    return done


def _timed(runner: Runner, batches: list[np.ndarray], iters: int | None, duration: float | None,
           progress: Progress | None) -> list[float]:
    """Milliseconds per call, for `iters` calls or as many as fit in `duration` seconds; progress at most
    every 0.1 s, so reporting costs the loop nothing measurable."""
    latencies: list[float] = []
    total = iters if iters is not None else int(1e3 * (duration or 0.0))
    last_report = begin = time.perf_counter()
    perf_counter, infer = time.perf_counter, runner.infer
    while True:
        x = batches[len(latencies) % len(batches)]
        t0 = perf_counter()
        infer(x)
        t1 = perf_counter()
        latencies.append(1e3 * (t1 - t0))
        finished = len(latencies) >= iters if iters is not None else t1 - begin >= (duration or 0.0)
        if progress is not None and (finished or t1 - last_report >= 0.1):
            progress(total if finished else (len(latencies) if iters is not None else int(1e3 * (t1 - begin))),
                     total)
            last_report = t1
        if finished:
            return latencies


def time_interleaved(runners: Sequence[Runner], images: np.ndarray, rounds: int, warmup: int = 0,
                     progress: Progress | None = None) -> np.ndarray:
    """(2, rounds) milliseconds of two active runners timed in `rounds` interleaved rounds on `images`, the
    two calls of a round back to back and alternating which goes first (ABBA, so an order effect cancels),
    after `warmup` calls of each: drift (clocks, thermals, other load) hits both alike, so paired ratios
    (metrics.paired_ratio) of the rounds compare them fairly on a busy machine."""
    for _ in range(warmup):
        for r in runners:
            r.infer(images)
    times = np.zeros((2, rounds))
    for i in range(rounds):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            runners[k].infer(images)  # synchronized by the Runner contract
            times[k, i] = (time.perf_counter() - start) * 1e3
        if progress is not None:
            progress(i + 1, rounds)
    return times


def write_json(result: BenchResult, path: str | Path) -> Path:
    """Write the result (every latency included) atomically."""
    from gprebn_edge.io import strict_json

    write_text_atomic(path, strict_json(result.to_dict(), indent=1) + "\n")  # a NaN or inf becomes null
    return Path(path)


def read_json(path: str | Path) -> BenchResult:
    try:
        return BenchResult.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise InputError(f"{path} is not a benchmark result written by gprebn-edge bench: {e}") from None


def format_table(result: BenchResult) -> Any:
    """A rich Table of the headline numbers, for the CLI."""
    from rich.table import Table
    from rich.text import Text

    s = result.stats
    title = f"{result.label()}, input {'x'.join(map(str, result.input_shape))}"
    table = Table(title=title, show_header=True, min_width=len(title) + 2)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("first call", f"{result.first_call_ms:.3f} ms" + ("" if result.first_call_cold else " (warm)")),
        *((f"p{q}", f"{s[f'p{q}']:.3f} ms") for q in PERCENTILES),
        ("mean ± std", f"{s['mean']:.3f} ± {s['std']:.3f} ms"),
        ("min / max", f"{s['min']:.3f} / {s['max']:.3f} ms"),
        ("throughput", f"{result.throughput:,.1f} images/s"),
        ("CV", f"{100 * result.cv:.1f} %"),
        ("iterations", f"{result.iterations} (+{result.warmup_iterations} warm-up)"),
    ]
    if result.activate_ms is not None:
        rows.insert(0, ("load", f"{result.activate_ms:.1f} ms"))
    if result.peak_host_memory_mb is not None:
        rows.append(("peak host memory", f"{result.peak_host_memory_mb:,.1f} MB"))
    if result.peak_device_memory_mb is not None:
        rows.append(("peak device memory", f"{result.peak_device_memory_mb:,.1f} MB"))
    for name, value in rows:
        table.add_row(name, value)
    for w in result.warnings:
        table.add_row(Text("warning", style="yellow"), Text(w, style="yellow"))
    return table
