"""TensorRT engines from an ONNX file, through NVIDIA's Polygraphy: network from ONNX (strongly typed, so the
engine runs in the precision the file says: fp32, fp16 or Q/DQ int8), one optimization profile over the
batch range, a timing cache, REFIT for engines the loop updates; refit with TensorRT's OnnxParserRefitter.

What stays here is our decisions (profile, names, manifest facts, atomic writes, one-line errors); the
building, parsing and refitting are Polygraphy's and TensorRT's. Works on TensorRT 10.x (JetPack 6) and
11.x: no precision builder flag and no calibrator is used (TensorRT 11 removes both). tensorrt and
polygraphy are imported inside the functions, so this module imports (and `--help` works) without them.

NOT RUN: no machine this project has used has TensorRT; the code is type-checked against TensorRT's stubs
and its argument checks are tested, nothing more (docs/gpu.md)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gprebn_edge.errors import ArtifactError, GprebnError, InputError
from gprebn_edge.io import atomic_path, sha256_file
from gprebn_edge.optional import import_polygraphy, import_tensorrt
from gprebn_edge.validate import oneline

__all__ = ["build_engine", "folded_weights", "parse_batch_range", "refit_engine", "refit_engine_file"]


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


def _image_input(onnx_path: Path) -> tuple[str, list[int], str]:
    """The ONNX file's one input (name, C/H/W) and precision; GprebnError unless only its batch axis is dynamic."""
    import onnx

    from gprebn_edge.export.precision import onnx_precision

    proto = onnx.load(str(onnx_path), load_external_data=False)
    names = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in names]
    if len(inputs) != 1:
        raise GprebnError(f"{onnx_path.name} has {len(inputs)} inputs; an image model has one")
    dims = inputs[0].type.tensor_type.shape.dim
    item = [d.dim_value for d in dims[1:]]
    if len(dims) != 4 or dims[0].dim_value > 0 or min(item) < 1:
        raise GprebnError(f"{onnx_path.name} input {inputs[0].name!r} is not (batch, C, H, W) with a dynamic batch: "
                          "re-export it with `gprebn-edge export`")
    return inputs[0].name, item, onnx_precision(proto)


def _polygraphy_error(what: str, e: Exception) -> GprebnError:
    return GprebnError(f"{what}: {oneline(e, 300)}")


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, batch: tuple[int, int, int] = (1, 8, 32),
                 workspace_mb: int = 1024, refittable: bool = False, timing_cache: str | Path | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build a strongly typed TensorRT engine from an ONNX file (dynamic batch axis) and write it atomically,
    with `batch` as the (min, opt, max) of its one optimization profile. The timing cache at `timing_cache`
    is read when present and rewritten (atomically) after the build. Returns the facts for the manifest."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    lo, opt, hi = parse_batch_range(":".join(map(str, batch)))
    if workspace_mb < 1:
        raise InputError(f"workspace must be at least 1 MiB, got {workspace_mb}")
    if not onnx_path.is_file():
        raise ArtifactError(f"no such ONNX file: {onnx_path}")
    cache = Path(timing_cache) if timing_cache is not None else None
    for what, out in (("engine", engine_path), ("timing cache", cache)):
        if out is not None and (out.is_dir() or not out.absolute().parent.is_dir()):
            raise GprebnError(f"cannot write the {what} to {out}: give a file in an existing folder")
    name, item, precision = _image_input(onnx_path)
    import_tensorrt()
    polygraphy = import_polygraphy()
    import tensorrt as trt  # after the check: typed against TensorRT's stubs (scripts/fix_trt_stubs.py)
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException

    say = progress or (lambda _msg: None)
    reused = cache is not None and cache.is_file()
    profile = Profile().add(name, min=(lo, *item), opt=(opt, *item), max=(hi, *item))
    config = CreateConfig(profiles=[profile], refittable=refittable,  # REFIT, not REFIT_IDENTICAL: weights change
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_mb << 20},
                          load_timing_cache=str(cache) if reused else None)
    new_cache = io.BytesIO()
    say(f"building the {precision} engine for batch {lo}:{opt}:{hi} (minutes on a Jetson)")
    start = time.perf_counter()
    try:
        network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
        serialized = EngineBytesFromNetwork(network, config, save_timing_cache=new_cache)()
    except PolygraphyException as e:
        raise _polygraphy_error(f"TensorRT could not build an engine from {onnx_path.name}", e) from None
    seconds = time.perf_counter() - start
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache is not None and new_cache.getbuffer().nbytes:
        with atomic_path(cache) as tmp:
            tmp.write_bytes(new_cache.getvalue())
    from gprebn_edge.runtime.environment import describe_environment

    env = describe_environment()
    return {"engine": str(engine_path), "engine_sha256": sha256_file(engine_path), "tensorrt": trt.__version__,
            "polygraphy": polygraphy.__version__, "gpu": (env.get("gpu") or {}).get("gpu"),
            "jetson": env.get("jetson"), "precision": precision, "strongly_typed": True,
            "batch": {"min": lo, "opt": opt, "max": hi}, "input": {"name": name, "shape": ["batch", *item]},
            "refittable": refittable, "workspace_mb": workspace_mb, "build_seconds": round(seconds, 2),
            "timing_cache": None if cache is None else {"path": str(cache), "reused": reused}}


def folded_weights(onnx_path: str | Path) -> dict[str, np.ndarray]:
    """The floating-point initializers of a folded ONNX file by name (= PyTorch parameter names)."""
    import onnx
    from onnx import numpy_helper

    path = Path(onnx_path)
    if not path.is_file():
        raise ArtifactError(f"no such ONNX file: {path}")
    arrays = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    return {name: a for name, a in arrays.items() if np.issubdtype(a.dtype, np.floating)}


def refit_engine(engine_bytes: bytes, weights: str | Path | Mapping[str, np.ndarray]) -> bytes:
    """A copy of the serialized refittable engine with new weights: from an ONNX file of the same graph (the
    way to do it: TensorRT's OnnxParserRefitter), or from a name -> array mapping (folded_weights(); kept for
    the device loop's current call). Every weight must be refitted; `engine_bytes` stay as they were."""
    import_tensorrt()
    import_polygraphy()
    import tensorrt as trt
    from polygraphy.backend.trt import EngineFromBytes, get_trt_logger
    from polygraphy.exception import PolygraphyException

    try:
        engine: trt.ICudaEngine = EngineFromBytes(engine_bytes)()
    except PolygraphyException as e:
        raise _polygraphy_error("not a TensorRT engine of this GPU and TensorRT version (rebuild it)", e) from None
    if not engine.refittable:
        raise GprebnError("the engine was built without REFIT: rebuild it with --refittable")
    refitter = trt.Refitter(engine, get_trt_logger())
    kept: list[np.ndarray] = []  # trt.Weights do not copy: the arrays must outlive refit_cuda_engine()
    if isinstance(weights, Mapping):
        for name, value in weights.items():
            kept.append(array := np.ascontiguousarray(value))
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise GprebnError(f"TensorRT rejected weight {name!r} (unknown name, size or type)")
    else:
        parser = trt.OnnxParserRefitter(refitter, get_trt_logger())
        if not parser.refit_from_file(str(weights)):
            found = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise GprebnError(f"TensorRT cannot refit from {Path(weights).name} (same graph? {found[:300]})")
    missing = refitter.get_missing_weights()
    if missing:
        raise GprebnError(f"refit is missing weights {', '.join(sorted(missing)[:5])}: give every weight")
    if not refitter.refit_cuda_engine():
        raise GprebnError("TensorRT could not refit the engine")
    del kept
    return bytes(engine.serialize())


def refit_engine_file(engine_path: str | Path, onnx_path: str | Path, out_path: str | Path | None = None) -> Path:
    """Refit the engine file from the ONNX file of the same graph; write the result atomically to `out_path`
    (default: over the engine, replaced only once the refit has succeeded). Returns the path written."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise ArtifactError(f"no such engine file: {engine_path}")
    if not Path(onnx_path).is_file():
        raise ArtifactError(f"no such ONNX file: {onnx_path}")
    refitted = refit_engine(engine_path.read_bytes(), onnx_path)
    out = Path(out_path) if out_path is not None else engine_path
    with atomic_path(out) as tmp:
        tmp.write_bytes(refitted)
    return out
