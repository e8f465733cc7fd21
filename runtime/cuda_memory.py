"""GPU buffers, one stream and CUDA graphs for TensorRT work, from torch.cuda (where a CUDA build of torch is
importable) or from cuda-python's runtime API: two interchangeable implementations behind one interface,
used by the TensorRT runner and by int8 calibration. Imports neither at import time."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from gprebn_edge.errors import GprebnError, MissingDependencyError

__all__ = ["DeviceMemory", "CudartMemory", "TorchMemory", "device_memory", "import_cudart", "torch_has_cuda"]


def _as_int(handle: Any) -> int:
    """A CUDA pointer or stream as an int (cuda-python wraps them in objects)."""
    try:
        return int(handle)
    except TypeError:
        return int(handle.getPtr())


class DeviceMemory(ABC):
    """Device buffers (by address), a stream (`stream`, an int) and one captured CUDA graph at a time.
    Copies are asynchronous on the stream: `sync()` before reading what `d2h` wrote."""

    kind = "?"
    stream = 0

    @abstractmethod
    def alloc(self, nbytes: int) -> int: ...

    @abstractmethod
    def free(self, ptr: int) -> None: ...

    @abstractmethod
    def h2d(self, ptr: int, host: np.ndarray) -> None: ...

    @abstractmethod
    def d2h(self, host: np.ndarray, ptr: int) -> None: ...

    @abstractmethod
    def sync(self) -> None: ...

    @abstractmethod
    def capture(self, enqueue: Any) -> None: ...

    @abstractmethod
    def launch(self) -> None: ...

    @abstractmethod
    def drop_graph(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class TorchMemory(DeviceMemory):
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


class CudartMemory(DeviceMemory):
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


def torch_has_cuda() -> bool:
    """True where torch is importable and sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def import_cudart() -> Any:
    """cuda-python's runtime module (ImportError where cuda-python is not installed)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def device_memory(buffers: str = "auto", device_id: int = 0, *, purpose: str = "TensorRT runs") -> DeviceMemory:
    """Device memory from "torch" (a CUDA build), "cuda-python", or "auto": torch where it has CUDA, else
    cuda-python. MissingDependencyError, naming `purpose`, where neither is there."""
    if buffers in ("auto", "torch"):
        if torch_has_cuda():
            import torch

            return TorchMemory(torch, device_id)
        if buffers == "torch":
            raise MissingDependencyError("buffers='torch' needs a CUDA build of torch (on a Jetson, NVIDIA's "
                                         "JetPack wheel); or pass buffers='cuda-python'")
    try:
        cudart = import_cudart()
    except ImportError:
        raise MissingDependencyError(f"{purpose} need GPU buffers from a CUDA build of torch or from cuda-python: "
                                     "pip install cuda-python") from None
    return CudartMemory(cudart, device_id)
