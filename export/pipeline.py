"""The export stage as one library call: adapted checkpoint -> folded ONNX + manifest (TensorRT engines
are not built yet; asking for one fails before any work, naming what to install)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch

from gprebn_edge import __version__
from gprebn_edge.adapt import calibration_tensors
from gprebn_edge.checkpoint import rebuild_model
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import open_source
from gprebn_edge.errors import GprebnError, MissingDependencyError
from gprebn_edge.export.fold import fold_batchnorm
from gprebn_edge.export.onnx_export import DEFAULT_OPSET, export_onnx
from gprebn_edge.io import write_text_atomic
from gprebn_edge.models.weights import sha256_file

__all__ = ["export_artifact", "default_onnx_path", "manifest_path", "require_tensorrt"]


def default_onnx_path(artifact: Path, unadapted: bool) -> Path:
    return artifact.with_name(artifact.stem + ("-unadapted" if unadapted else "") + ".onnx")


def manifest_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.stem + ".manifest.json")


def require_tensorrt() -> None:
    """Fail early, before any work, where TensorRT is not importable."""
    if importlib.util.find_spec("tensorrt") is None:
        raise MissingDependencyError("TensorRT is not installed: pip install 'gprebn-edge[trt]' (on a Jetson, "
                                     "JetPack's python3-libnvinfer in a venv made with --system-site-packages)")


def export_artifact(artifact: str | Path, onnx_path: str | Path | None = None, *, unadapted: bool = False,
                    data: str | None = None, check_images: int = 1000, trt: bool = False,
                    opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Fold the adapted (or, with `unadapted`, the source) model of `artifact`, export it to ONNX, check
    onnxruntime against PyTorch on up to `check_images` real images (`data`, default: the artifact's own
    calibration data) and write the ONNX file and its manifest atomically. Returns the manifest."""
    if trt:
        require_tensorrt()
        raise GprebnError("TensorRT engine building is not implemented yet; export the ONNX file without --trt")
    artifact = Path(artifact)
    start = time.perf_counter()
    which = "source" if unadapted else "adapted"
    model, meta = rebuild_model(artifact, which)
    preprocess = Preprocess.from_dict(meta["preprocess"])
    spec = data or meta["calibration"]["spec"]
    try:
        source = open_source(spec, preprocess, shuffle=True, seed=meta["method"].get("seed", 0),
                             limit=check_images)
    except GprebnError as e:
        raise GprebnError(f"cannot read the images to check the export against ({e}); pass --data") from None
    batches = [t.numpy() for t in calibration_tensors(source, 250)]
    if not batches:
        raise GprebnError(f"no readable images in {spec} to check the export against; pass --data")
    example = torch.from_numpy(batches[0][:2])
    folded, report = fold_batchnorm(model, example)
    out = Path(onnx_path) if onnx_path is not None else default_onnx_path(artifact, unadapted)
    onnx_meta = {"gprebn_edge": __version__, "model": which, "artifact": artifact.name,
                 "preprocess": meta["preprocess"], "num_classes": str(meta["num_classes"])}
    parity = export_onnx(folded, out, example, check_batches=batches, metadata=onnx_meta, opset=opset)
    import onnxruntime

    manifest = {
        "onnx": str(out), "onnx_sha256": sha256_file(out), "model": which,
        "artifact": str(artifact), "artifact_sha256": sha256_file(artifact),
        "opset": opset, "input": {"name": "input", "shape": ["batch", *batches[0].shape[1:]], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", meta["num_classes"]]},
        "preprocess": meta["preprocess"], "exporter": "torch.onnx.export(dynamo=False)",
        "versions": {"gprebn_edge": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "parity": {"data": spec, **parity.to_dict()},
        "fold": report.to_dict(),
        "seconds": round(time.perf_counter() - start, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tensorrt": None,
    }
    write_text_atomic(manifest_path(out), json.dumps(manifest, indent=1) + "\n")
    return manifest
