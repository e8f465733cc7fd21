"""TensorRT backend (TensorRT 10 API): a deserialized engine, name-based I/O, `execute_async_v3` on one
stream, optionally replayed as a CUDA graph.

Device buffers come from torch (when a CUDA build of torch is importable) or from cuda-python's runtime
API; tensorrt, torch and cuda-python are all imported when a runner is activated, never at import."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gprebn_edge.errors import ArtifactError, GprebnError, InputError, MissingDependencyError
from gprebn_edge.optional import import_tensorrt
from gprebn_edge.runtime.base import Runner, RunnerInfo, TensorInfo

if TYPE_CHECKING:  # checked against TensorRT's stubs where installed (scripts/fix_trt_stubs.py)
    import tensorrt as trt

__all__ = ["TensorRTRunner", "import_tensorrt", "ENGINE_SUFFIXES"]

_REBUILD = ("TensorRT engines are specific to the GPU and the TensorRT version that built them: rebuild it on "
            "this device with `gprebn-edge export ARTIFACT --trt`")

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")

# TensorRT DataType names -> numpy (types numpy lacks, such as BF16 or FP8, cannot be engine I/O here)
_NUMPY_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "UINT8": "uint8", "INT32": "int32",
                 "INT64": "int64", "BOOL": "bool"}


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _numpy_dtype(dtype: trt.DataType, tensor: str, path: Path) -> np.dtype:
    if dtype.name not in _NUMPY_DTYPES:
        raise ArtifactError(f"{path}: tensor {tensor!r} is {dtype.name}, which numpy cannot hold: export the "
                            "engine with float32 (or float16) inputs and outputs")
    return np.dtype(_NUMPY_DTYPES[dtype.name])


def _as_int(handle: Any) -> int:
    """A CUDA pointer or stream as an int (cuda-python wraps them in objects)."""
    try:
        return int(handle)
    except TypeError:
        return int(handle.getPtr())


# -- device memory: two interchangeable implementations ---------------------------------------------
class _TorchMemory:
    """Buffers, stream and graphs from torch.cuda."""

    kind = "torch"

    def __init__(self, torch: Any, device_id: int) -> None:
        self.torch = torch
        self.device = torch.device("cuda", device_id)
        self._stream = torch.cuda.Stream(self.device)
        self.stream = int(self._stream.cuda_stream)
        self._buffers: dict[int, Any] = {}
        self._graph: Any = None

    def alloc(self, nbytes: int) -> int:
        t = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device=self.device)
        self._buffers[int(t.data_ptr())] = t
        return int(t.data_ptr())

    def free(self, ptr: int) -> None:
        self._buffers.pop(ptr, None)

    def _bytes(self, host: np.ndarray) -> Any:
        return self.torch.from_numpy(host.reshape(-1).view(np.uint8))

    def h2d(self, ptr: int, host: np.ndarray) -> None:
        with self.torch.cuda.stream(self._stream):
            self._buffers[ptr][: host.nbytes].copy_(self._bytes(host))

    def d2h(self, host: np.ndarray, ptr: int) -> None:
        with self.torch.cuda.stream(self._stream):
            self._bytes(host).copy_(self._buffers[ptr][: host.nbytes])

    def sync(self) -> None:
        self._stream.synchronize()

    def capture(self, enqueue: Any) -> None:
        self._graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.stream(self._stream):
            self._graph.capture_begin()
            try:
                enqueue()
            finally:
                self._graph.capture_end()

    def launch(self) -> None:
        with self.torch.cuda.stream(self._stream):
            self._graph.replay()

    def drop_graph(self) -> None:
        self._graph = None

    def close(self) -> None:
        self.sync()
        self._graph = None
        self._buffers.clear()


class _CudartMemory:
    """Buffers, stream and graphs from cuda-python's runtime API (cudaMalloc, cudaMemcpyAsync, ...)."""

    kind = "cuda-python"

    def __init__(self, cudart: Any, device_id: int) -> None:
        self.rt = cudart
        self._call(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self._stream = self._call(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream = _as_int(self._stream)
        self._buffers: set[int] = set()
        self._graph: Any = None
        self._exec: Any = None

    def _call(self, result: Any, what: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise GprebnError(f"CUDA call {what} failed: {getattr(err, 'name', err)}")
        return values[0] if len(values) == 1 else values

    def alloc(self, nbytes: int) -> int:
        ptr = _as_int(self._call(self.rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
        self._buffers.add(ptr)
        return ptr

    def free(self, ptr: int) -> None:
        if ptr in self._buffers:
            self._buffers.discard(ptr)
            self._call(self.rt.cudaFree(ptr), "cudaFree")

    def h2d(self, ptr: int, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self._stream), "cudaMemcpyAsync")

    def d2h(self, host: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self._stream), "cudaMemcpyAsync")

    def sync(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def capture(self, enqueue: Any) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        self._call(self.rt.cudaStreamBeginCapture(self._stream, mode), "cudaStreamBeginCapture")
        try:
            enqueue()
        finally:
            self._graph = self._call(self.rt.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
        self._exec = self._call(self.rt.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")

    def launch(self) -> None:
        self._call(self.rt.cudaGraphLaunch(self._exec, self._stream), "cudaGraphLaunch")

    def drop_graph(self) -> None:
        if self._exec is not None:
            self._call(self.rt.cudaGraphExecDestroy(self._exec), "cudaGraphExecDestroy")
        if self._graph is not None:
            self._call(self.rt.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
        self._exec = self._graph = None

    def close(self) -> None:
        self.sync()
        self.drop_graph()
        for ptr in list(self._buffers):
            self.free(ptr)
        self._call(self.rt.cudaStreamDestroy(self._stream), "cudaStreamDestroy")


def _device_memory(buffers: str, device_id: int) -> _TorchMemory | _CudartMemory:
    if buffers in ("auto", "torch"):
        try:
            import torch

            if torch.cuda.is_available():
                return _TorchMemory(torch, device_id)
        except ImportError:
            pass
        if buffers == "torch":
            raise MissingDependencyError("buffers='torch' needs a CUDA build of torch (on a Jetson, NVIDIA's "
                                         "JetPack wheel); or pass buffers='cuda-python'")
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise MissingDependencyError("TensorRT runs need GPU buffers from a CUDA build of torch or from "
                                         "cuda-python: pip install cuda-python") from None
    return _CudartMemory(cudart, device_id)


def _make_logger() -> Any:
    """A TensorRT logger that keeps errors and warnings, so failures become one-line messages."""
    import tensorrt as trt

    errors = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in errors:
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(msg)

    return _Logger()


class TensorRTRunner(Runner):
    """Run a serialized TensorRT engine (one image input, logits output; other outputs are computed and
    ignored). `cuda_graph` captures `execute_async_v3` once per input shape and replays the graph.
    `buffers` picks where device memory comes from: "auto" (torch when it has CUDA, else cuda-python),
    "torch" or "cuda-python"."""

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, *, cuda_graph: bool = False, device_id: int = 0,
                 buffers: str = "auto") -> None:
        super().__init__()
        if buffers not in ("auto", "torch", "cuda-python"):
            raise InputError(f"buffers must be auto, torch or cuda-python, got {buffers!r}")
        self.path = Path(engine_path)
        self.cuda_graph = cuda_graph
        self.device_id = device_id
        self.buffers = buffers
        self._logger: Any = None
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._mem: _TorchMemory | _CudartMemory | None = None
        self._inputs: list[TensorInfo] = []
        self._outputs: list[TensorInfo] = []
        self._dtypes: dict[str, np.dtype] = {}
        self._ptrs: dict[str, int] = {}
        self._capacity: dict[str, int] = {}
        self._shape: tuple[int, ...] | None = None
        self._out_shapes: dict[str, tuple[int, ...]] = {}
        self._captured = False
        self._version = ""

    # -- lifecycle --------------------------------------------------------------------------------
    def _activate(self) -> None:
        tensorrt = import_tensorrt()
        if not self.path.is_file():
            raise InputError(f"no such TensorRT engine: {self.path}")
        self._version = str(getattr(tensorrt, "__version__", "?"))
        self._mem = _device_memory(self.buffers, self.device_id)
        try:
            self._load()
        except BaseException:
            self._deactivate()
            raise

    def _load(self) -> None:
        import tensorrt as trt

        self._inputs, self._outputs, self._dtypes = [], [], {}
        self._logger = _make_logger()
        self._runtime = runtime = trt.Runtime(self._logger)
        engine: trt.ICudaEngine | None
        try:
            engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        except Exception as e:  # some versions raise instead of returning None
            self._logger.errors.append(str(e))
            engine = None
        if engine is None:
            why = self._logger.errors[-1].strip().splitlines()[0][:200] if self._logger.errors else "unknown cause"
            raise ArtifactError(f"cannot load {self.path} with TensorRT {self._version} ({why}). {_REBUILD}")
        self._engine = engine
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dims = _dims(engine.get_tensor_shape(name))
            shape = tuple(d if d >= 0 else ("batch" if j == 0 else None) for j, d in enumerate(dims))
            dtype = _numpy_dtype(engine.get_tensor_dtype(name), name, self.path)
            self._dtypes[name] = dtype
            info = TensorInfo(name=name, shape=shape, dtype=dtype.name)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs).append(info)
        if len(self._inputs) != 1 or not self._outputs:
            raise ArtifactError(f"{self.path} has inputs {[t.name for t in self._inputs]} and outputs "
                                f"{[t.name for t in self._outputs]}: runners take one image batch in, logits out")
        self._context = engine.create_execution_context()
        if self._context is None:
            raise GprebnError(f"TensorRT could not create an execution context for {self.path} (out of GPU "
                              "memory?)")

    def _deactivate(self) -> None:
        if self._mem is not None:
            try:
                self._mem.close()
            finally:
                self._mem = None
        self._context = self._engine = self._runtime = None
        self._ptrs.clear()
        self._capacity.clear()
        self._out_shapes.clear()
        self._shape = None
        self._captured = False

    # -- inference --------------------------------------------------------------------------------
    def _profile(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(min, max) input shape the engine accepts: its first optimization profile, or its static shape."""
        info = self._inputs[0]
        if all(isinstance(d, int) for d in info.shape):
            static = tuple(int(d) for d in info.shape if isinstance(d, int))
            return static, static
        assert self._engine is not None
        lo, _, hi = (_dims(dims) for dims in self._engine.get_tensor_profile_shape(info.name, 0))
        return lo, hi

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        lo, hi = self._profile()
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
            raise InputError(f"{self.path.name} was built for input shapes {list(lo)} to {list(hi)}, got "
                             f"{list(shape)}: pass a batch in that range or rebuild the engine with a wider "
                             "profile")

    def _bind(self, shape: tuple[int, ...]) -> None:
        """Set the input shape, size the buffers and bind every tensor's address."""
        context = self._context
        assert self._mem is not None and context is not None
        name = self._inputs[0].name
        self._check_shape(shape)
        if not context.set_input_shape(name, shape):
            raise InputError(f"TensorRT refused input shape {list(shape)} for {self.path.name}")
        shapes = {name: shape}
        for t in self._outputs:
            shapes[t.name] = _dims(context.get_tensor_shape(t.name))
        for tname, tshape in shapes.items():
            nbytes = int(np.prod(tshape)) * self._dtypes[tname].itemsize
            if self._capacity.get(tname, -1) < nbytes:
                if tname in self._ptrs:
                    self._mem.free(self._ptrs[tname])
                self._ptrs[tname] = self._mem.alloc(nbytes)
                self._capacity[tname] = nbytes
            if not context.set_tensor_address(tname, self._ptrs[tname]):
                raise GprebnError(f"TensorRT refused the buffer address of tensor {tname!r}")
        self._out_shapes = {t.name: shapes[t.name] for t in self._outputs}
        self._shape = shape
        if self._captured:
            self._mem.drop_graph()
            self._captured = False

    def _enqueue(self) -> None:
        assert self._mem is not None and self._context is not None
        if not self._context.execute_async_v3(self._mem.stream):
            why = self._logger.errors[-1].strip().splitlines()[0][:200] if self._logger.errors else "no detail"
            raise GprebnError(f"TensorRT inference failed on {self.path.name}: {why}")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        assert self._mem is not None
        name = self._inputs[0].name
        x = np.ascontiguousarray(batch, dtype=self._dtypes[name])
        shape = tuple(int(d) for d in x.shape)
        if shape != self._shape:
            self._bind(shape)
        self._mem.h2d(self._ptrs[name], x)
        if self.cuda_graph:
            if not self._captured:
                self._enqueue()  # one plain run after a shape change, before capture (TensorRT's advice)
                self._mem.sync()
                self._mem.capture(self._enqueue)
                self._captured = True
            self._mem.launch()
        else:
            self._enqueue()
        out = self._outputs[0]
        for t in self._outputs:
            if t.name == "logits":
                out = t
        host = np.empty(self._out_shapes[out.name], dtype=self._dtypes[out.name])
        self._mem.d2h(host, self._ptrs[out.name])
        self._mem.sync()
        return host.astype(np.float32, copy=False)

    # -- description ------------------------------------------------------------------------------
    def _need_engine(self) -> None:
        if self._engine is None:
            raise InputError(f"{self.name}: the engine's inputs and outputs are known once it is loaded: "
                             "use `with runner:` first")

    def inputs(self) -> list[TensorInfo]:
        self._need_engine()
        return list(self._inputs)

    def outputs(self) -> list[TensorInfo]:
        self._need_engine()
        return list(self._outputs)

    def info(self) -> RunnerInfo:
        details: dict[str, Any] = {"path": str(self.path), "tensorrt": self._version or None,
                                   "cuda_graph": self.cuda_graph}
        if self._mem is not None:
            details["buffers"] = self._mem.kind
        precision = "as built"  # an engine does not record its builder flags; the export manifest does
        if self._engine is not None:
            engine_bytes = getattr(self._engine, "device_memory_size_v2", None)
            if engine_bytes is None:
                engine_bytes = getattr(self._engine, "device_memory_size", 0)
            details["device_memory_bytes"] = int(engine_bytes or 0) + sum(self._capacity.values())
            details["io_dtypes"] = {name: d.name for name, d in self._dtypes.items()}
            details["profile"] = [list(d) for d in self._profile()]
        return RunnerInfo(backend=self.name, device=f"cuda:{self.device_id}", precision=precision, details=details)
