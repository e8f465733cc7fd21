"""TensorRT 10 engines from the folded ONNX file: build (fp32/fp16/int8, one optimization profile over the
batch range, timing cache, REFIT for engines the loop updates). Refitting is in tensorrt_refit (its names are
re-exported here); the logger and its error capture are the runtime's (runtime/tensorrt_common.py).

`tensorrt` is imported only inside the functions that need it, after `import_tensorrt()` has checked that it
is there and is 10.x, so this module imports (and `--help` works) without it. The plain `import tensorrt as
trt` that follows the check is what lets mypy type every call against the stubs (scripts/fix_trt_stubs.py).
Batch parsing is a plain function, testable anywhere; int8 calibration is in tensorrt_calibration.
Engines are specific to the GPU and the TensorRT version: build them on the device (docs/design.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gprebn_edge.errors import ArtifactError, GprebnError, InputError
from gprebn_edge.export.tensorrt_calibration import CalibrationFeed, entropy_calibrator, rechunk_batches
from gprebn_edge.export.tensorrt_refit import folded_weights, refit_engine, refit_engine_file
from gprebn_edge.io import atomic_path
from gprebn_edge.models.weights import sha256_file
from gprebn_edge.optional import TRT_INSTALL_FIX, import_tensorrt
from gprebn_edge.runtime.cuda_memory import import_cudart, torch_has_cuda
from gprebn_edge.runtime.tensorrt_common import ErrorLog, capture_errors, trt_logger

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["ErrorLog", "PRECISIONS", "TRT_INSTALL_FIX", "build_engine", "capture_errors", "folded_weights",
           "import_tensorrt", "parse_batch_range", "rechunk_batches", "refit_engine", "refit_engine_file",
           "trt_logger"]

PRECISIONS = ("fp32", "fp16", "int8")
_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())  # TensorRT's warnings reach logging, not stderr, unless configured


def parse_batch_range(text: str) -> tuple[int, int, int]:
    """`MIN:OPT:MAX` (or `N`, meaning N:N:N) -> (min, opt, max) with 1 <= MIN <= OPT <= MAX."""
    parts = text.strip().split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise InputError(f"bad batch range {text!r}: give MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX (e.g. 1:8:32), "
                         "or one number N for N:N:N")
    return values[0], values[1], values[2]


def _gpu() -> dict[str, str | None]:
    """Name and compute capability of device 0, via torch.cuda or cuda-python; None where unknown."""
    try:
        if torch_has_cuda():
            import torch

            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
        err, prop = import_cudart().cudaGetDeviceProperties(0)
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return {"gpu": name.rstrip("\x00"), "compute_capability": f"{prop.major}.{prop.minor}"}
    except Exception:  # informational only: a manifest without the GPU name beats no engine
        return {"gpu": None, "compute_capability": None}


def _progress_monitor(report: Callable[[str], None], failures: list[BaseException]) -> trt.IProgressMonitor:
    """Reports top-level build phases; an exception in `report` (or Ctrl-C) cancels the build."""
    import tensorrt as trt

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None and not failures:
                try:
                    report(f"TensorRT: {phase_name}")
                except BaseException as e:
                    failures.append(e)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return not failures  # False cancels the build

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


def _parse(builder: trt.Builder, onnx_path: Path, errors: ErrorLog) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """The network of the ONNX file; the parser comes back too, as it owns the weights until the build."""
    import tensorrt as trt

    network = builder.create_network(0)  # TensorRT 10: always explicit batch; 0 leaves STRONGLY_TYPED off
    parser = trt.OnnxParser(network, trt_logger())
    if not parser.parse_from_file(str(onnx_path)):
        found = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
        raise GprebnError(f"TensorRT cannot parse {onnx_path.name}: {'; '.join(found) or errors.since()}")
    if network.num_inputs != 1:
        raise GprebnError(f"{onnx_path.name} has {network.num_inputs} inputs; an image model has one")
    return network, parser


def _use_timing_cache(config: trt.IBuilderConfig, path: Path) -> bool:
    """Load the timing cache at `path` into `config` (a new one if absent or stale); True if it was reused."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data) if data else None
    reused = cache is not None and config.set_timing_cache(cache, False)
    if data and not reused:
        _log.warning("timing cache %s is unreadable or from another GPU or TensorRT version: starting anew", path)
    if not reused:
        config.set_timing_cache(config.create_timing_cache(b""), False)
    return reused


def _io(tensors: Iterable[trt.ITensor]) -> list[dict[str, Any]]:
    return [{"name": t.name, "shape": [t.shape[i] for i in range(len(t.shape))]} for t in tensors]


@dataclass(frozen=True)
class _Plan:
    """build_engine's arguments, checked before TensorRT is imported."""

    onnx: Path
    engine: Path
    precision: str
    batch: tuple[int, int, int]
    workspace_mb: int
    refittable: bool
    timing_cache: Path | None
    calibration_cache: Path | None


def _plan(onnx_path: str | Path, engine_path: str | Path, precision: str, batch: tuple[int, int, int],
          workspace_mb: int, refittable: bool, timing_cache: str | Path | None, has_calibration: bool,
          calibration_cache: str | Path | None) -> _Plan:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    lo_opt_hi = parse_batch_range(":".join(map(str, batch)))
    if workspace_mb < 1:
        raise InputError(f"workspace must be at least 1 MiB, got {workspace_mb}")
    cal_cache = Path(calibration_cache) if calibration_cache is not None else None
    if precision == "int8" and not has_calibration and not (cal_cache and cal_cache.is_file()):
        raise InputError("int8 needs calibration data (or an existing calibration cache)")
    plan = _Plan(Path(onnx_path), Path(engine_path), precision, lo_opt_hi, workspace_mb, refittable,
                 Path(timing_cache) if timing_cache is not None else None, cal_cache)
    if not plan.onnx.is_file():
        raise ArtifactError(f"no such ONNX file: {plan.onnx}")
    for what, out in (("engine", plan.engine), ("timing cache", plan.timing_cache),
                      ("calibration cache", plan.calibration_cache)):
        if out is not None and (out.is_dir() or not out.absolute().parent.is_dir()):
            raise GprebnError(f"cannot write the {what} to {out}: give a file in an existing folder")
    return plan


def _builder(precision: str, errors: ErrorLog) -> trt.Builder:
    import tensorrt as trt

    try:
        builder = trt.Builder(trt_logger())
    except TypeError:  # pybind's "factory function returned nullptr": no usable CUDA device
        raise GprebnError(f"TensorRT cannot start a builder (is there a CUDA GPU?): {errors.since()}") from None
    if precision == "fp16" and not builder.platform_has_fast_fp16:
        raise GprebnError("this GPU has no fast fp16: build with precision fp32")
    if precision == "int8" and not builder.platform_has_fast_int8:
        raise GprebnError("this GPU has no fast int8: build with precision fp16 or fp32")
    return builder


def _image_input(network: trt.INetworkDefinition, onnx_path: Path) -> tuple[trt.ITensor, tuple[int, ...]]:
    """The network's input and its (C, H, W); GprebnError unless its batch axis alone is dynamic."""
    inp = network.get_input(0)
    shape = [inp.shape[i] for i in range(len(inp.shape))]
    if len(shape) != 4 or shape[0] != -1 or min(shape[1:]) < 1:
        raise GprebnError(f"{onnx_path.name} input {inp.name!r} is {shape}; expected (-1, C, H, W): "
                          "re-export the ONNX with a dynamic batch axis and a fixed image size")
    return inp, tuple(shape[1:])


def _config(builder: trt.Builder, plan: _Plan, name: str, item: tuple[int, ...],
            errors: ErrorLog) -> tuple[trt.IBuilderConfig, bool]:
    """The builder config: batch profile, workspace, precision and REFIT flags, timing cache (and whether
    the cache on disk was reused)."""
    import tensorrt as trt

    lo, opt, hi = plan.batch
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(name, trt.Dims([lo, *item]), trt.Dims([opt, *item]), trt.Dims([hi, *item]))
    if config.add_optimization_profile(profile) < 0:
        raise GprebnError(f"TensorRT rejected the batch profile {lo}:{opt}:{hi}: {errors.since()}")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mb << 20)
    if plan.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)  # not REFIT_IDENTICAL: the refitted weights differ
    reused = _use_timing_cache(config, plan.timing_cache) if plan.timing_cache is not None else False
    return config, reused


def _calibrate(builder: trt.Builder, config: trt.IBuilderConfig, plan: _Plan, name: str, item: tuple[int, ...],
               calibration: Iterable[np.ndarray] | None,
               failures: list[BaseException]) -> tuple[CalibrationFeed, trt.IInt8EntropyCalibrator2]:
    """Set int8 with an entropy calibrator fed `opt` images at a time; the feed and the calibrator come back
    for the caller to keep alive (the config does not own them)."""
    import tensorrt as trt

    opt = plan.batch[1]
    config.set_flag(trt.BuilderFlag.INT8)
    feed = CalibrationFeed(rechunk_batches(calibration if calibration is not None else [], opt), item,
                            plan.calibration_cache, failures)
    config.int8_calibrator = calibrator = entropy_calibrator(feed, opt)
    fixed = trt.Dims([opt, *item])  # calibration runs at one shape: `opt` images at a time
    calib_profile = builder.create_optimization_profile()
    calib_profile.set_shape(name, fixed, fixed, fixed)
    config.set_calibration_profile(calib_profile)
    return feed, calibrator


def _facts(plan: _Plan, network: trt.INetworkDefinition, seconds: float, cache_reused: bool,
           feed: CalibrationFeed | None) -> dict[str, Any]:
    """What the manifest records about the engine written."""
    import tensorrt as trt

    lo, opt, hi = plan.batch
    cal = plan.calibration_cache
    return {
        "engine": str(plan.engine), "engine_sha256": sha256_file(plan.engine), "tensorrt": trt.__version__,
        **_gpu(), "precision": plan.precision, "batch": {"min": lo, "opt": opt, "max": hi},
        "inputs": _io(network.get_input(i) for i in range(network.num_inputs)),
        "outputs": _io(network.get_output(i) for i in range(network.num_outputs)),
        "refittable": plan.refittable, "workspace_mb": plan.workspace_mb, "build_seconds": round(seconds, 2),
        "timing_cache": None if plan.timing_cache is None else {"path": str(plan.timing_cache),
                                                                "reused": cache_reused},
        "int8_calibration": None if feed is None else {"batches": feed.used, "batch_size": opt,
                                                       "cache": None if cal is None else str(cal)},
    }


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, precision: str = "fp32",
                 batch: tuple[int, int, int] = (1, 8, 32), workspace_mb: int = 1024, refittable: bool = False,
                 timing_cache: str | Path | None = None, calibration: Iterable[np.ndarray] | None = None,
                 calibration_cache: str | Path | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build a TensorRT engine from a folded ONNX file (dynamic batch axis) and write it atomically.

    `batch` is the (min, opt, max) of the one optimization profile; int8 calibrates on `calibration`
    (float32 NCHW batches of any size, re-cut to `opt` rows) or on an existing `calibration_cache`.
    Returns the facts for the manifest (TensorRT version, GPU, profile, I/O, sha256 of the engine)."""
    plan = _plan(onnx_path, engine_path, precision, batch, workspace_mb, refittable, timing_cache,
                 calibration is not None, calibration_cache)
    import_tensorrt()
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    with capture_errors() as errors:
        builder = _builder(precision, errors)
        say(f"parsing {plan.onnx.name}")
        network, parser = _parse(builder, plan.onnx, errors)
        inp, item = _image_input(network, plan.onnx)
        config, cache_reused = _config(builder, plan, inp.name, item, errors)
        failures: list[BaseException] = []  # raised in callbacks that TensorRT calls during the build
        feed = calibrator = monitor = None  # the config does not own them: these references keep them alive
        if precision == "int8":
            feed, calibrator = _calibrate(builder, config, plan, inp.name, item, calibration, failures)
        if progress is not None:
            config.progress_monitor = monitor = _progress_monitor(progress, failures)
        say(f"building the {precision} engine for batch {':'.join(map(str, plan.batch))} (minutes on a Jetson)")
        try:
            serialized = builder.build_serialized_network(network, config)
        finally:
            if feed is not None:
                feed.close()
            del parser, calibrator, monitor  # held until here: the parser owns the network's weights
    if failures:
        raise failures[0]
    cal = plan.calibration_cache
    if feed is not None and feed.used == 0 and not (cal and cal.is_file()):
        opt = plan.batch[1]
        raise InputError(f"int8 calibration got no batch of {opt} images: give at least {opt} calibration images")
    if serialized is None:
        raise GprebnError(f"TensorRT could not build the engine: {errors.since()}")
    seconds = time.perf_counter() - start
    with atomic_path(plan.engine) as tmp:
        tmp.write_bytes(bytes(serialized))
    if plan.timing_cache is not None:
        with atomic_path(plan.timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return _facts(plan, network, seconds, cache_reused, feed)
