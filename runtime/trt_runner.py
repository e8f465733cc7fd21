"""TensorRT backend: a serialized engine run by NVIDIA Polygraphy's `TrtRunner` (buffers, stream, shapes
and `execute_async_v3` are Polygraphy's). What stays here: our Runner interface (one image input, logits
out as float32 numpy), the profile check's message, and one-line errors. TensorRT 10.x and 11.x.

tensorrt and polygraphy are imported when a runner is activated, never at import. CUDA graph replay is not
offered (Polygraphy's runner has none): use the torch backend, or onnxruntime's TensorRT provider.
NOT RUN: no machine this project has used has TensorRT (docs/gpu.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gprebn_edge.errors import ArtifactError, GprebnError, InputError
from gprebn_edge.optional import import_polygraphy, import_tensorrt
from gprebn_edge.runtime.base import Runner, RunnerInfo, TensorInfo
from gprebn_edge.validate import oneline

__all__ = ["TensorRTRunner", "ENGINE_SUFFIXES"]

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
_REBUILD = ("TensorRT engines are specific to the GPU and the TensorRT version that built them: rebuild it on "
            "this device with `gprebn-edge export ARTIFACT --trt`")


class TensorRTRunner(Runner):
    """Run a serialized TensorRT engine (one image input; the `logits` output, or the first one). The
    engine's GPU is the current CUDA device: pick another with CUDA_VISIBLE_DEVICES."""

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, *, cuda_graph: bool = False, device_id: int = 0) -> None:
        super().__init__()
        if cuda_graph:
            raise InputError("CUDA graphs are not offered with TensorRT engines (Polygraphy's runner has none): drop "
                             "--cuda-graphs, or use the torch backend")
        self.path = Path(engine_path)
        self.cuda_graph = False
        self.device_id = device_id
        self._runner: Any = None
        self._version = ""

    def _activate(self) -> None:
        import_tensorrt()
        import_polygraphy()
        import tensorrt as trt  # after the check: typed against TensorRT's stubs (scripts/fix_trt_stubs.py)

        if not self.path.is_file():
            raise InputError(f"no such TensorRT engine: {self.path}")
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        from polygraphy.exception import PolygraphyException

        self._version = str(trt.__version__)
        runner = TrtRunner(EngineFromBytes(self.path.read_bytes()))
        try:
            runner.activate()
        except PolygraphyException as e:
            raise ArtifactError(f"cannot load {self.path} with TensorRT {self._version} ({oneline(e, 200)}). "
                                f"{_REBUILD}") from None
        self._runner = runner

    def _describe_io(self) -> tuple[list[TensorInfo], list[TensorInfo]] | None:
        if self._runner is None:
            return None
        import tensorrt as trt
        from polygraphy.datatype import DataType

        engine: trt.ICudaEngine = self._runner.engine
        io: dict[bool, list[TensorInfo]] = {True: [], False: []}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dims = engine.get_tensor_shape(name)
            values = [int(dims[j]) for j in range(len(dims))]
            shape = tuple(d if d >= 0 else ("batch" if j == 0 else None) for j, d in enumerate(values))
            dtype = np.dtype(DataType.to_dtype(DataType.from_dtype(engine.get_tensor_dtype(name)), "numpy")).name
            io[engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT].append(TensorInfo(name, shape, dtype))
        return io[True], io[False]

    def _deactivate(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.deactivate()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        from polygraphy.exception import PolygraphyException

        assert self._io is not None
        (inp,), outputs = self._io
        out = next((t for t in outputs if t.name == "logits"), outputs[0])
        try:
            result = self._runner.infer({inp.name: np.ascontiguousarray(batch, dtype=inp.dtype)})
        except PolygraphyException as e:
            lo, _, hi = (list(d) for d in self._runner.engine.get_tensor_profile_shape(inp.name, 0))
            raise InputError(f"{self.label} was built for input shapes {lo} to {hi}, got {list(batch.shape)} "
                             f"({oneline(e, 160)}): pass a batch in that range, or rebuild with a wider --batch") \
                from None
        logits = result[out.name]
        if not isinstance(logits, np.ndarray):
            raise GprebnError(f"{self.label}: TensorRT returned {type(logits).__name__}, not an array")
        return logits.astype(np.float32, copy=False)

    def info(self) -> RunnerInfo:
        details: dict[str, Any] = {"path": str(self.path), "tensorrt": self._version or None, "runner": "polygraphy"}
        if self._io is not None:
            details["io_dtypes"] = {t.name: t.dtype for t in (*self._io[0], *self._io[1])}
        # an engine's precision is its ONNX file's (strongly typed): the export manifest records it
        return RunnerInfo(backend=self.name, device=f"cuda:{self.device_id}", precision="as built", details=details)
