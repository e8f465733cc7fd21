"""TensorRT 10 engines from the folded ONNX file: build (fp32/fp16/int8, one optimization profile over the
batch range, timing cache, REFIT for engines the loop updates) and refit by initializer name.

`tensorrt` is imported only inside the functions that need it, after `import_tensorrt()` has checked that it
is there and is 10.x, so this module imports (and `--help` works) without it. The plain `import tensorrt as
trt` that follows the check is what lets mypy type every call against the stubs (scripts/fix_trt_stubs.py).
Batch parsing, re-chunking of calibration data and error bookkeeping are plain functions, testable anywhere.
Engines are specific to the GPU and the TensorRT version: build them on the device (docs/design.md)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gprebn_edge.errors import ArtifactError, GprebnError, InputError, MissingDependencyError
from gprebn_edge.io import atomic_path
from gprebn_edge.models.weights import sha256_file
from gprebn_edge.optional import TRT_INSTALL_FIX, import_tensorrt

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["ErrorLog", "PRECISIONS", "TRT_INSTALL_FIX", "build_engine", "folded_weights", "import_tensorrt",
           "parse_batch_range", "rechunk_batches", "refit_engine", "refit_engine_file", "trt_logger"]

PRECISIONS = ("fp32", "fp16", "int8")
_NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "BF16": None, "INT8": np.int8, "INT32": np.int32,
                 "INT64": np.int64, "UINT8": np.uint8, "BOOL": np.bool_}
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


def rechunk_batches(batches: Iterable[np.ndarray], size: int, *, drop_last: bool = True) -> Iterator[np.ndarray]:
    """Re-cut batches of any sizes into C-contiguous float32 batches of exactly `size` rows, in order. The
    remainder (< size rows) is dropped, or yielded as a last, smaller batch when not `drop_last`."""
    if size < 1:
        raise InputError(f"batch size must be >= 1, got {size}")
    pending: list[np.ndarray] = []
    count = 0
    item_shape: tuple[int, ...] | None = None
    for batch in batches:
        batch = np.asarray(batch)
        if batch.ndim < 1 or not np.issubdtype(batch.dtype, np.floating):
            raise InputError(f"calibration batches must be float arrays (N, C, H, W), got {batch.dtype} "
                             f"{batch.shape}")
        if item_shape is None:
            item_shape = batch.shape[1:]
        elif batch.shape[1:] != item_shape:
            raise InputError(f"calibration batches differ in shape: {batch.shape[1:]} after {item_shape}")
        pending.append(batch)
        count += len(batch)
        while count >= size:
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield np.ascontiguousarray(joined[:size], dtype=np.float32)
            pending, count = ([joined[size:]] if count > size else []), count - size
    if count and not drop_last:
        yield np.ascontiguousarray(np.concatenate(pending), dtype=np.float32)


class ErrorLog:
    """The last TensorRT error messages, for GprebnError messages; thread-safe, bounded."""

    def __init__(self, keep: int = 50) -> None:
        self._lines: deque[tuple[int, str]] = deque(maxlen=keep)
        self._count = 0
        self._lock = threading.Lock()

    def add(self, message: str) -> None:
        with self._lock:
            self._lines.append((self._count, " ".join(message.split())))
            self._count += 1

    def mark(self) -> int:
        """A position; `since(mark)` returns what was logged after it."""
        with self._lock:
            return self._count

    def since(self, mark: int, last: int = 3) -> str:
        with self._lock:
            lines = [m for i, m in self._lines if i >= mark][-last:]
        return "; ".join(lines) if lines else "no error message from TensorRT"


TRT_ERRORS = ErrorLog()


@functools.cache  # one per process: TensorRT keeps using the first logger it is given
def trt_logger() -> trt.ILogger:
    """The process's TensorRT logger: errors are kept in TRT_ERRORS; everything goes to `logging`."""
    import_tensorrt()
    import tensorrt as trt

    errors = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)

    class RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # the trampoline needs the explicit base __init__

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in errors:
                TRT_ERRORS.add(msg)
                _log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                _log.warning("TensorRT: %s", msg)
            else:
                _log.debug("TensorRT: %s", msg)

    return RecordingLogger()


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class _DeviceBuffer:
    """A device allocation filled from host arrays: torch.cuda where torch has CUDA, else cuda-python."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        if _torch_cuda():
            import torch

            self._tensor: Any = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            self.ptr = int(self._tensor.data_ptr())
            return
        try:
            self._cudart = _cudart()
        except ImportError:
            raise MissingDependencyError("int8 calibration needs GPU memory from torch with CUDA or from "
                                         "cuda-python: pip install cuda-python") from None
        err, ptr = self._cudart.cudaMalloc(nbytes)
        self._check(err, "cudaMalloc")
        self._tensor, self.ptr = None, int(ptr)

    def _check(self, err: Any, what: str) -> None:
        if err != self._cudart.cudaError_t.cudaSuccess:
            raise GprebnError(f"{what} failed: {err}")

    def upload(self, host: np.ndarray) -> int:
        """Copy `host` (contiguous, at most nbytes) to the start of the buffer; synchronous. Returns ptr."""
        assert host.flags.c_contiguous and host.nbytes <= self.nbytes
        if self._tensor is not None:
            import torch

            self._tensor[: host.nbytes].copy_(torch.from_numpy(host.reshape(-1).view(np.uint8)))
            torch.cuda.current_stream().synchronize()  # TensorRT reads it on its own stream
        else:
            kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            (err,) = self._cudart.cudaMemcpy(self.ptr, host.ctypes.data, host.nbytes, kind)
            self._check(err, "cudaMemcpy")
        return self.ptr

    def free(self) -> None:
        if self._tensor is None and self.ptr:
            self._cudart.cudaFree(self.ptr)
        self._tensor, self.ptr = None, 0


def _gpu() -> dict[str, str | None]:
    """Name and compute capability of device 0, via torch.cuda or cuda-python; None where unknown."""
    try:
        if _torch_cuda():
            import torch

            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
        err, prop = _cudart().cudaGetDeviceProperties(0)
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return {"gpu": name.rstrip("\x00"), "compute_capability": f"{prop.major}.{prop.minor}"}
    except Exception:  # informational only: a manifest without the GPU name beats no engine
        return {"gpu": None, "compute_capability": None}


class _CalibrationFeed:
    """The Python side of the calibrator: batches to device pointers, the calibration cache file. Exceptions
    (Ctrl-C included) cannot cross TensorRT's C++ callbacks: they go to `failures`, and build_engine raises."""

    def __init__(self, batches: Iterator[np.ndarray], item_shape: tuple[int, ...], cache: Path | None,
                 failures: list[BaseException]) -> None:
        self.batches, self.item_shape, self.cache, self.failures = batches, item_shape, cache, failures
        self.used = 0
        self.buffer: _DeviceBuffer | None = None

    def next_pointers(self) -> list[int]:
        try:
            batch = next(self.batches, None)
            if batch is None or self.failures:
                return []  # the end of calibration
            if batch.shape[1:] != self.item_shape:
                raise InputError(f"calibration images are {batch.shape[1:]}, the network input is {self.item_shape}")
            if self.buffer is None:
                self.buffer = _DeviceBuffer(batch.nbytes)
            self.used += 1
            return [self.buffer.upload(batch)]
        except BaseException as e:
            self.failures.append(e)
            return []

    def read_cache(self) -> bytes | None:
        return self.cache.read_bytes() if self.cache is not None and self.cache.is_file() else None

    def write_cache(self, data: bytes) -> None:
        try:
            if self.cache is not None:
                with atomic_path(self.cache) as tmp:
                    tmp.write_bytes(data)
        except BaseException as e:
            self.failures.append(e)

    def close(self) -> None:
        if self.buffer is not None:
            self.buffer.free()


def _calibrator(feed: _CalibrationFeed, size: int) -> trt.IInt8EntropyCalibrator2:
    import tensorrt as trt

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # the trampoline needs the explicit base __init__

        def get_batch_size(self) -> int:
            return size

        def get_batch(self, names: list[str]) -> list[int]:
            return feed.next_pointers()

        def read_calibration_cache(self) -> bytes | None:  # None: no cache, calibrate
            return feed.read_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            feed.write_cache(bytes(cache))

    return EntropyCalibrator()


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


def _parse(builder: trt.Builder, onnx_path: Path, mark: int) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """The network of the ONNX file; the parser comes back too, as it owns the weights until the build."""
    import tensorrt as trt

    network = builder.create_network(0)  # TensorRT 10: always explicit batch; 0 leaves STRONGLY_TYPED off
    parser = trt.OnnxParser(network, trt_logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
        raise GprebnError(f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors) or TRT_ERRORS.since(mark)}")
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


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, precision: str = "fp32",
                 batch: tuple[int, int, int] = (1, 8, 32), workspace_mb: int = 1024, refittable: bool = False,
                 timing_cache: str | Path | None = None, calibration: Iterable[np.ndarray] | None = None,
                 calibration_cache: str | Path | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build a TensorRT engine from a folded ONNX file (dynamic batch axis) and write it atomically.

    `batch` is the (min, opt, max) of the one optimization profile; int8 calibrates on `calibration`
    (float32 NCHW batches of any size, re-cut to `opt` rows) or on an existing `calibration_cache`.
    Returns the facts for the manifest (TensorRT version, GPU, profile, I/O, sha256 of the engine)."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    lo, opt, hi = parse_batch_range(":".join(map(str, batch)))
    if workspace_mb < 1:
        raise InputError(f"workspace must be at least 1 MiB, got {workspace_mb}")
    cal_cache = Path(calibration_cache) if calibration_cache is not None else None
    if precision == "int8" and calibration is None and not (cal_cache and cal_cache.is_file()):
        raise InputError("int8 needs calibration data (or an existing calibration cache)")
    if not onnx_path.is_file():
        raise ArtifactError(f"no such ONNX file: {onnx_path}")
    cache_path = Path(timing_cache) if timing_cache is not None else None
    for what, out in (("engine", engine_path), ("timing cache", cache_path), ("calibration cache", cal_cache)):
        if out is not None and (out.is_dir() or not out.absolute().parent.is_dir()):
            raise GprebnError(f"cannot write the {what} to {out}: give a file in an existing folder")

    import_tensorrt()
    import tensorrt as trt

    say = progress or (lambda _msg: None)
    logger, mark, start = trt_logger(), TRT_ERRORS.mark(), time.perf_counter()
    try:
        builder = trt.Builder(logger)
    except TypeError:  # pybind's "factory function returned nullptr": no usable CUDA device
        raise GprebnError(f"TensorRT cannot start a builder (is there a CUDA GPU?): {TRT_ERRORS.since(mark)}") from None
    if precision == "fp16" and not builder.platform_has_fast_fp16:
        raise GprebnError("this GPU has no fast fp16: build with precision fp32")
    if precision == "int8" and not builder.platform_has_fast_int8:
        raise GprebnError("this GPU has no fast int8: build with precision fp16 or fp32")
    say(f"parsing {onnx_path.name}")
    network, parser = _parse(builder, onnx_path, mark)
    inp = network.get_input(0)
    dims = [inp.shape[i] for i in range(len(inp.shape))]
    if len(dims) != 4 or dims[0] != -1 or min(dims[1:]) < 1:
        raise GprebnError(f"{onnx_path.name} input {inp.name!r} is {dims}; expected (-1, C, H, W): "
                          "re-export the ONNX with a dynamic batch axis and a fixed image size")
    item = tuple(dims[1:])

    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, trt.Dims([lo, *item]), trt.Dims([opt, *item]), trt.Dims([hi, *item]))
    if config.add_optimization_profile(profile) < 0:
        raise GprebnError(f"TensorRT rejected the batch profile {lo}:{opt}:{hi}: {TRT_ERRORS.since(mark)}")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)  # not REFIT_IDENTICAL: the refitted weights differ
    cache_reused = _use_timing_cache(config, cache_path) if cache_path is not None else False
    failures: list[BaseException] = []  # raised in callbacks that TensorRT calls during the build
    feed = calibrator = monitor = None  # the config does not own them: these references keep them alive
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        chunks = rechunk_batches(calibration if calibration is not None else [], opt)
        feed = _CalibrationFeed(chunks, item, cal_cache, failures)
        config.int8_calibrator = calibrator = _calibrator(feed, opt)
        fixed = trt.Dims([opt, *item])  # calibration runs at one shape: `opt` images at a time
        calib_profile = builder.create_optimization_profile()
        calib_profile.set_shape(inp.name, fixed, fixed, fixed)
        config.set_calibration_profile(calib_profile)
    if progress is not None:
        config.progress_monitor = monitor = _progress_monitor(progress, failures)

    say(f"building the {precision} engine for batch {lo}:{opt}:{hi} (minutes on a Jetson)")
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if feed is not None:
            feed.close()
        del parser, calibrator, monitor  # held until here: the parser owns the network's weights
    if failures:
        raise failures[0]
    if feed is not None and feed.used == 0 and not (cal_cache and cal_cache.is_file()):
        raise InputError(f"int8 calibration got no batch of {opt} images: give at least {opt} calibration images")
    if serialized is None:
        raise GprebnError(f"TensorRT could not build the engine: {TRT_ERRORS.since(mark)}")
    seconds = time.perf_counter() - start

    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "engine": str(engine_path), "engine_sha256": sha256_file(engine_path), "tensorrt": trt.__version__,
        **_gpu(), "precision": precision, "batch": {"min": lo, "opt": opt, "max": hi},
        "inputs": _io(network.get_input(i) for i in range(network.num_inputs)),
        "outputs": _io(network.get_output(i) for i in range(network.num_outputs)),
        "refittable": refittable, "workspace_mb": workspace_mb, "build_seconds": round(seconds, 2),
        "timing_cache": None if cache_path is None else {"path": str(cache_path), "reused": cache_reused},
        "int8_calibration": None if feed is None else {"batches": feed.used, "batch_size": opt,
                                                       "cache": None if cal_cache is None else str(cal_cache)},
    }


def folded_weights(onnx_path: str | Path) -> dict[str, np.ndarray]:
    """The floating-point initializers of a folded ONNX file by name (= PyTorch parameter names): what to
    refit an engine built from the same graph with. Integer initializers (shapes, indices) are not weights."""
    import onnx
    from onnx import numpy_helper

    path = Path(onnx_path)
    if not path.is_file():
        raise ArtifactError(f"no such ONNX file: {path}")
    graph = onnx.load(str(path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    return {name: a for name, a in arrays.items() if np.issubdtype(a.dtype, np.floating)}


def _names(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def refit_engine(engine_bytes: bytes, weights: Mapping[str, np.ndarray], *, allow_partial: bool = False) -> bytes:
    """A copy of the serialized refittable engine with `weights` (name -> array) in place of its own.

    Works on a fresh deserialization, so `engine_bytes` and any engine made from them stay as they were.
    Every refittable float weight of the engine must be given (a weight left out would silently keep its
    old value) unless `allow_partial`; unknown names, wrong sizes or dtypes raise GprebnError."""
    import_tensorrt()
    import tensorrt as trt

    logger, mark = trt_logger(), TRT_ERRORS.mark()
    try:
        runtime = trt.Runtime(logger)  # kept in a variable: it must outlive the engine
        engine = runtime.deserialize_cuda_engine(engine_bytes)
    except TypeError:  # pybind's "factory function returned nullptr": no usable CUDA device
        raise GprebnError(f"TensorRT cannot start a runtime (is there a CUDA GPU?): {TRT_ERRORS.since(mark)}") from None
    if engine is None:
        raise ArtifactError("not a TensorRT engine for this GPU and TensorRT version (engines are specific to "
                            f"both: rebuild it here): {TRT_ERRORS.since(mark)}")
    if not engine.refittable:
        raise GprebnError("the engine was built without REFIT: rebuild it with refittable=True (--refittable)")
    refitter = trt.Refitter(engine, logger)
    known = set(refitter.get_all_weights())
    unknown = set(weights) - known
    if unknown:
        raise GprebnError(f"the engine has no refittable weights named {_names(unknown)}: refit with the folded "
                          "weights of a model with the same graph (export both the same way)")
    expected = {n: refitter.get_weights_prototype(n) for n in known}
    kept = []  # trt.Weights do not copy: the arrays must outlive refit_cuda_engine()
    for name, value in weights.items():
        array = np.ascontiguousarray(value)
        proto = expected[name]
        dtype = _NUMPY_DTYPES.get(proto.dtype.name)
        if dtype is None or array.dtype != dtype or array.size != proto.size:
            raise GprebnError(f"weight {name!r} is {array.dtype} with {array.size} values; the engine expects "
                              f"{proto.dtype.name} with {proto.size}")
        kept.append(array)
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise GprebnError(f"TensorRT rejected weight {name!r}: {TRT_ERRORS.since(mark)}")
    left_out = {n for n, p in expected.items() if n not in weights and p.dtype.name in ("FLOAT", "HALF", "BF16")}
    if left_out and not allow_partial:
        raise GprebnError(f"refit is missing weights {_names(left_out)}: give every weight (folded_weights() of "
                          "the other model's ONNX)")
    missing = refitter.get_missing_weights()
    if missing:
        raise GprebnError(f"TensorRT needs these weights too before refitting: {_names(missing)}")
    if not refitter.refit_cuda_engine():
        raise GprebnError(f"TensorRT could not refit the engine: {TRT_ERRORS.since(mark)}")
    del kept
    return bytes(engine.serialize())


def refit_engine_file(engine_path: str | Path, weights: Mapping[str, np.ndarray],
                      out_path: str | Path | None = None) -> Path:
    """Refit the engine file with `weights`; write the result atomically to `out_path` (default: over the
    engine itself, which is only replaced once the refit has succeeded). Returns the path written."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise ArtifactError(f"no such engine file: {engine_path}")
    refitted = refit_engine(engine_path.read_bytes(), weights)
    out = Path(out_path) if out_path is not None else engine_path
    with atomic_path(out) as tmp:
        tmp.write_bytes(refitted)
    return out
