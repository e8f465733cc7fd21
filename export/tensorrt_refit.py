"""Refit a TensorRT 10 engine by initializer name: the weights of a folded ONNX file (= PyTorch parameter
names) replace those of a refittable engine built from the same graph, so the device loop can update an
engine without rebuilding it. `tensorrt` is imported only inside the functions, after `import_tensorrt()`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gprebn_edge.errors import ArtifactError, GprebnError
from gprebn_edge.io import atomic_path
from gprebn_edge.optional import import_tensorrt
from gprebn_edge.runtime.tensorrt_common import ErrorLog, capture_errors, numpy_dtype, trt_logger

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["folded_weights", "refit_engine", "refit_engine_file"]


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


def _deserialize(trt: Any, engine_bytes: bytes, errors: ErrorLog) -> tuple[trt.Runtime, trt.ICudaEngine]:
    """A runtime and the engine it deserialized (the runtime must outlive the engine)."""
    try:
        runtime = trt.Runtime(trt_logger())
        engine = runtime.deserialize_cuda_engine(engine_bytes)
    except TypeError:  # pybind's "factory function returned nullptr": no usable CUDA device
        raise GprebnError(f"TensorRT cannot start a runtime (is there a CUDA GPU?): {errors.since()}") from None
    if engine is None:
        raise ArtifactError("not a TensorRT engine for this GPU and TensorRT version (engines are specific to "
                            f"both: rebuild it here): {errors.since()}")
    return runtime, engine


def _set_weights(trt: Any, refitter: trt.Refitter, weights: Mapping[str, np.ndarray], allow_partial: bool,
                 errors: ErrorLog) -> list[np.ndarray]:
    """Hand every weight to the refitter after checking names, dtypes and sizes; returns the arrays, which
    must outlive refit_cuda_engine() (trt.Weights do not copy)."""
    known = set(refitter.get_all_weights())
    unknown = set(weights) - known
    if unknown:
        raise GprebnError(f"the engine has no refittable weights named {_names(unknown)}: refit with the folded "
                          "weights of a model with the same graph (export both the same way)")
    expected = {n: refitter.get_weights_prototype(n) for n in known}
    kept = []
    for name, value in weights.items():
        array = np.ascontiguousarray(value)
        proto = expected[name]
        dtype = numpy_dtype(proto.dtype.name)
        if dtype is None or array.dtype != dtype or array.size != proto.size:
            raise GprebnError(f"weight {name!r} is {array.dtype} with {array.size} values; the engine expects "
                              f"{proto.dtype.name} with {proto.size}")
        kept.append(array)
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise GprebnError(f"TensorRT rejected weight {name!r}: {errors.since()}")
    left_out = {n for n, p in expected.items() if n not in weights and p.dtype.name in ("FLOAT", "HALF", "BF16")}
    if left_out and not allow_partial:
        raise GprebnError(f"refit is missing weights {_names(left_out)}: give every weight (folded_weights() of "
                          "the other model's ONNX)")
    return kept


def refit_engine(engine_bytes: bytes, weights: Mapping[str, np.ndarray], *, allow_partial: bool = False) -> bytes:
    """A copy of the serialized refittable engine with `weights` (name -> array) in place of its own.

    Works on a fresh deserialization, so `engine_bytes` and any engine made from them stay as they were.
    Every refittable float weight of the engine must be given (a weight left out would silently keep its
    old value) unless `allow_partial`; unknown names, wrong sizes or dtypes raise GprebnError."""
    import_tensorrt()
    import tensorrt as trt

    with capture_errors() as errors:
        runtime, engine = _deserialize(trt, engine_bytes, errors)
        if not engine.refittable:
            raise GprebnError("the engine was built without REFIT: rebuild it with refittable=True (--refittable)")
        refitter = trt.Refitter(engine, trt_logger())
        kept = _set_weights(trt, refitter, weights, allow_partial, errors)
        missing = refitter.get_missing_weights()
        if missing:
            raise GprebnError(f"TensorRT needs these weights too before refitting: {_names(missing)}")
        if not refitter.refit_cuda_engine():
            raise GprebnError(f"TensorRT could not refit the engine: {errors.since()}")
        del kept
        refitted = bytes(engine.serialize())
        del runtime  # held until the engine is serialized
    return refitted


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
