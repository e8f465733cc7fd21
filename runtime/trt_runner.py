"""TensorRT backend (TensorRT 10 API): a deserialized engine, name-based I/O, `execute_async_v3` on one
stream, optionally replayed as a CUDA graph.

Device buffers come from torch (when a CUDA build of torch is importable) or from cuda-python's runtime
API (cuda_memory); the TensorRT logger is the process's one (tensorrt_common). tensorrt, torch and
cuda-python are all imported when a runner is activated, never at import."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gprebn_edge.errors import ArtifactError, GprebnError, InputError
from gprebn_edge.optional import import_tensorrt
from gprebn_edge.runtime.base import Runner, RunnerInfo, TensorInfo
from gprebn_edge.runtime.cuda_memory import DeviceMemory, device_memory
from gprebn_edge.runtime.tensorrt_common import capture_errors, dims, numpy_dtype, trt_logger

if TYPE_CHECKING:  # checked against TensorRT's stubs where installed (scripts/fix_trt_stubs.py)
    import tensorrt as trt

__all__ = ["TensorRTRunner", "import_tensorrt", "ENGINE_SUFFIXES"]

_REBUILD = ("TensorRT engines are specific to the GPU and the TensorRT version that built them: rebuild it on "
            "this device with `gprebn-edge export ARTIFACT --trt`")

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def _numpy_dtype(dtype: trt.DataType, tensor: str, path: Path) -> np.dtype:
    found = numpy_dtype(dtype.name)
    if found is None:
        raise ArtifactError(f"{path}: tensor {tensor!r} is {dtype.name}, which numpy cannot hold: export the "
                            "engine with float32 (or float16) inputs and outputs")
    return found


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
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._mem: DeviceMemory | None = None
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
        self._mem = device_memory(self.buffers, self.device_id)
        import tensorrt as trt

        self._runtime = runtime = trt.Runtime(trt_logger())  # kept: it must outlive the engine
        engine: trt.ICudaEngine | None
        with capture_errors() as errors:
            try:
                engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
            except Exception as e:  # some versions raise instead of returning None
                errors.add(str(e))
                engine = None
        if engine is None:
            raise ArtifactError(f"cannot load {self.path} with TensorRT {self._version} ({errors.since(last=1)[:200]})"
                                f". {_REBUILD}")
        self._engine = engine
        context = engine.create_execution_context()
        if context is None:
            raise GprebnError(f"TensorRT could not create an execution context for {self.path} (out of GPU "
                              "memory?)")
        self._context = context

    def _describe_io(self) -> tuple[list[TensorInfo], list[TensorInfo]] | None:
        import tensorrt as trt

        engine = self._engine
        if engine is None:
            return None
        inputs: list[TensorInfo] = []
        outputs: list[TensorInfo] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(d if d >= 0 else ("batch" if j == 0 else None)
                          for j, d in enumerate(dims(engine.get_tensor_shape(name))))
            info = TensorInfo(name, shape, _numpy_dtype(engine.get_tensor_dtype(name), name, self.path).name)
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(info)
        return inputs, outputs

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
        info = self.inputs()[0]
        if all(isinstance(d, int) for d in info.shape):
            static = tuple(int(d) for d in info.shape if isinstance(d, int))
            return static, static
        assert self._engine is not None
        lo, _, hi = (dims(d) for d in self._engine.get_tensor_profile_shape(info.name, 0))
        return lo, hi

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        lo, hi = self._profile()
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
            raise InputError(f"{self.label} was built for input shapes {list(lo)} to {list(hi)}, got "
                             f"{list(shape)}: pass a batch in that range or rebuild the engine with a wider "
                             "profile")

    def _bind(self, shape: tuple[int, ...]) -> None:
        """Set the input shape, size the buffers and bind every tensor's address."""
        context, io = self._context, self._io
        assert self._mem is not None and context is not None and io is not None
        (inp,), outputs = io
        self._check_shape(shape)
        if not context.set_input_shape(inp.name, shape):
            raise InputError(f"TensorRT refused input shape {list(shape)} for {self.path.name}")
        shapes = {inp.name: shape, **{t.name: dims(context.get_tensor_shape(t.name)) for t in outputs}}
        itemsizes = {t.name: np.dtype(t.dtype).itemsize for t in (inp, *outputs)}
        for tname, tshape in shapes.items():
            nbytes = int(np.prod(tshape)) * itemsizes[tname]
            if self._capacity.get(tname, -1) < nbytes:
                if tname in self._ptrs:
                    self._mem.free(self._ptrs[tname])
                self._ptrs[tname] = self._mem.alloc(nbytes)
                self._capacity[tname] = nbytes
            if not context.set_tensor_address(tname, self._ptrs[tname]):
                raise GprebnError(f"TensorRT refused the buffer address of tensor {tname!r}")
        self._out_shapes = {t.name: shapes[t.name] for t in outputs}
        self._shape = shape
        if self._captured:
            self._mem.drop_graph()
            self._captured = False

    def _enqueue(self) -> None:
        assert self._mem is not None and self._context is not None
        with capture_errors() as errors:
            ok = self._context.execute_async_v3(self._mem.stream)
        if not ok:
            raise GprebnError(f"TensorRT inference failed on {self.path.name}: {errors.since(last=1)[:200]}")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        assert self._mem is not None and self._io is not None
        (inp,), outputs = self._io
        shape = tuple(int(d) for d in batch.shape)
        if shape != self._shape:
            self._bind(shape)
        self._mem.h2d(self._ptrs[inp.name], batch)
        if self.cuda_graph:
            if not self._captured:
                self._enqueue()  # one plain run after a shape change, before capture (TensorRT's advice)
                self._mem.sync()
                self._mem.capture(self._enqueue)
                self._captured = True
            self._mem.launch()
        else:
            self._enqueue()
        out = next((t for t in outputs if t.name == "logits"), outputs[0])
        host = np.empty(self._out_shapes[out.name], dtype=out.dtype)
        self._mem.d2h(host, self._ptrs[out.name])
        self._mem.sync()
        return host.astype(np.float32, copy=False)

    # -- description ------------------------------------------------------------------------------
    def info(self) -> RunnerInfo:
        details: dict[str, Any] = {"path": str(self.path), "tensorrt": self._version or None,
                                   "cuda_graph": self.cuda_graph}
        if self._mem is not None:
            details["buffers"] = self._mem.kind
        precision = "as built"  # an engine does not record its builder flags; the export manifest does
        if self._engine is not None and self._io is not None:
            engine_bytes = getattr(self._engine, "device_memory_size_v2", None)
            if engine_bytes is None:
                engine_bytes = getattr(self._engine, "device_memory_size", 0)
            details["device_memory_bytes"] = int(engine_bytes or 0) + sum(self._capacity.values())
            details["io_dtypes"] = {t.name: t.dtype for t in (*self._io[0], *self._io[1])}
            details["profile"] = [list(d) for d in self._profile()]
        return RunnerInfo(backend=self.name, device=f"cuda:{self.device_id}", precision=precision, details=details)
