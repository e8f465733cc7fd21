"""The export stage as one library call: adapted checkpoint -> folded ONNX (+ TensorRT engine) + manifest.

Folding happens in PyTorch (fold.py, torch.fx) where it can be proven there, then in the exported ONNX graph
for the BatchNorms left (onnx_fold.py); a model torch.fx cannot trace is exported with its BatchNorms and
folded in the ONNX graph only. The manifest says, per BN, where it was folded or why it was kept. Where an engine is
asked for, TensorRT is checked before any work, so a machine without it fails at once and writes nothing."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gprebn_edge import __version__
from gprebn_edge.adapt import calibration_tensors
from gprebn_edge.checkpoint import rebuild_model
from gprebn_edge.consent import CodeConsent
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import open_source
from gprebn_edge.errors import GprebnError
from gprebn_edge.export.fold import FoldReport, UntraceableModelError, fold_batchnorm
from gprebn_edge.export.onnx_export import DEFAULT_OPSET, export_onnx
from gprebn_edge.export.onnx_fold import export_folded_onnx_fallback
from gprebn_edge.io import strict_json, write_text_atomic
from gprebn_edge.models.weights import sha256_file
from gprebn_edge.optional import import_tensorrt

__all__ = ["EngineOptions", "export_artifact", "export_model", "default_onnx_path", "default_engine_path",
           "manifest_path", "require_tensorrt"]


def default_onnx_path(artifact: Path, unadapted: bool) -> Path:
    return artifact.with_name(artifact.stem + ("-unadapted" if unadapted else "") + ".onnx")


def default_engine_path(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".engine")


@dataclass
class EngineOptions:
    """What `export --trt` builds: precision fp32/fp16/int8 (int8 calibrates on the check images), the
    (min, opt, max) batch of the optimization profile, the REFIT flag, and where the engine and the timing
    cache go (defaults: the ONNX path with .engine, and gprebn-edge.timing.cache beside the engine)."""

    engine: Path | None = None
    precision: str = "fp32"
    batch: tuple[int, int, int] = (1, 1, 32)
    refittable: bool = False
    workspace_mb: int = 1024
    timing_cache: Path | None = None


def manifest_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.stem + ".manifest.json")


def require_tensorrt() -> None:
    """Fail early, before any work, where TensorRT is not importable."""
    import_tensorrt()


def _fold(model: torch.nn.Module, example: torch.Tensor) -> tuple[torch.nn.Module, Any, list[FoldReport], str]:
    """(reference model, exporter, fold report holder, where folding happens). In PyTorch (torch.fx) what it
    can prove foldable, then, in the exported graph, the BNs it left that the ONNX graph shows foldable; a
    model torch.fx cannot trace is folded in the ONNX graph only. The report is filled in when the exporter
    runs; each folded BN says where it was folded."""
    reports: list[FoldReport] = []
    try:
        folded, fx_report = fold_batchnorm(model, example)
    except UntraceableModelError:
        def exporter(m: torch.nn.Module, path: Path, x: torch.Tensor, opset: int) -> None:
            reports.append(export_folded_onnx_fallback(m, path, x, opset))

        return model, exporter, reports, "onnx (torch.fx cannot trace the model)"

    def fx_then_onnx(_: torch.nn.Module, path: Path, x: torch.Tensor, opset: int) -> None:
        reports.append(fx_report.then(export_folded_onnx_fallback(folded, path, x, opset)))

    # the exporter writes the folded model; parity is checked against the original, so it covers the fold
    return model, fx_then_onnx, reports, "pytorch (torch.fx), then onnx for the BNs left"


def export_artifact(artifact: str | Path, onnx_path: str | Path | None = None, *, unadapted: bool = False,
                    data: str | None = None, check_images: int = 1000, engine: EngineOptions | None = None,
                    opset: int = DEFAULT_OPSET, progress: Callable[[str], None] | None = None,
                    consent: CodeConsent | None = None) -> dict[str, Any]:
    """Fold the adapted (or, with `unadapted`, the source) model of `artifact`, export it to ONNX, check
    onnxruntime against PyTorch on up to `check_images` real images (`data`, default: the artifact's own
    calibration data) and write the ONNX file and its manifest atomically; with `engine`, also build a
    TensorRT engine from that ONNX file. Model code the artifact names is imported only with `consent`
    (see gprebn_edge.consent). Returns the manifest."""
    say = progress or (lambda _: None)
    if engine is not None:
        require_tensorrt()
    artifact = Path(artifact)
    start = time.perf_counter()
    which = "source" if unadapted else "adapted"
    model, meta = rebuild_model(artifact, which, consent=consent)
    preprocess = Preprocess.from_dict(meta["preprocess"])
    spec = data or meta["calibration"]["spec"]
    try:
        source = open_source(spec, preprocess, shuffle=True, seed=meta["method"].get("seed", 0),
                             limit=check_images)
    except GprebnError as e:
        fix = "" if data else "; pass --data"
        raise GprebnError(f"cannot read the images to check the export against ({e}){fix}") from None
    batches = [t.numpy() for t in calibration_tensors(source, 250)]
    if not batches:
        raise GprebnError(f"no readable images in {spec} to check the export against"
                          f"{'' if data else '; pass --data'}")
    out = Path(onnx_path) if onnx_path is not None else default_onnx_path(artifact, unadapted)
    manifest = export_model(model, meta, out, batches, which=which, artifact=artifact, data=spec, opset=opset,
                            progress=say)
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    if engine is not None:
        manifest["tensorrt"] = _build_engine(out, engine, batches, say)
        manifest["seconds"] = round(time.perf_counter() - start, 2)
        write_text_atomic(manifest_path(out), strict_json(manifest, indent=1) + "\n")
    return manifest


def export_model(model: torch.nn.Module, meta: dict[str, Any], out: Path, batches: list[np.ndarray], *,
                 which: str = "adapted", artifact: Path | None = None, data: str = "in-memory images",
                 opset: int = DEFAULT_OPSET, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fold an eval-mode model of an artifact (its metadata `meta`), export it to `out`, check parity on
    `batches` (float32 NCHW) and write the ONNX file and its manifest atomically. Returns the manifest.
    `export_artifact` and the device loop (which exports models it adapted in memory) both end here."""
    say = progress or (lambda _: None)
    start = time.perf_counter()
    example = torch.from_numpy(batches[0][:2])
    say("folding BatchNorm")
    reference, exporter, reports, fold_level = _fold(model, example)
    onnx_meta = {"gprebn_edge": __version__, "model": which, "artifact": artifact.name if artifact else "",
                 "preprocess": meta["preprocess"], "num_classes": str(meta["num_classes"])}
    health = _adaptation_health(meta, which)
    if health is not None:  # compare and the loop read it back and warn where it was not clean
        onnx_meta["adaptation_health"] = strict_json(health)
    say(f"exporting ONNX and checking it on {sum(len(b) for b in batches)} images")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        parity = export_onnx(reference, out, example, check_batches=batches, metadata=onnx_meta, opset=opset,
                             exporter=exporter)
    traced = sorted({str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)})
    import onnxruntime

    manifest = {
        "onnx": str(out), "onnx_sha256": sha256_file(out), "model": which,
        "artifact": str(artifact) if artifact else None,
        "artifact_sha256": sha256_file(artifact) if artifact else None,
        "opset": opset, "input": {"name": "input", "shape": ["batch", *batches[0].shape[1:]], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", meta["num_classes"]]},
        "preprocess": meta["preprocess"], "exporter": "torch.onnx.export(dynamo=False)",
        "versions": {"gprebn_edge": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "parity": {"data": data, **parity.to_dict()},
        "fold": {"where": fold_level, **reports[0].to_dict()},
        "warnings": [f"TracerWarning: {w}" for w in traced],
        "seconds": round(time.perf_counter() - start, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tensorrt": None,
        "adaptation_health": health,
    }
    try:
        write_text_atomic(manifest_path(out), strict_json(manifest, indent=1) + "\n")
    except BaseException:  # an ONNX file without its manifest is a partial export: remove it
        out.unlink(missing_ok=True)
        raise
    return manifest


def _adaptation_health(meta: dict[str, Any], which: str) -> dict[str, Any] | None:
    """The adapt stage's health verdict and signals, for the adapted model of an artifact that has them."""
    summary = meta.get("summary")
    health = summary.get("health") if which == "adapted" and isinstance(summary, dict) else None
    if not isinstance(health, dict):
        return None
    return {"verdict": health.get("verdict"), "signals": health.get("signals", []),
            **({"reason": health["reason"]} if "reason" in health else {})}


def _build_engine(onnx_file: Path, options: EngineOptions, batches: list, say: Callable[[str], None]) -> dict:
    from gprebn_edge.export.tensorrt_build import build_engine

    path = options.engine or default_engine_path(onnx_file)
    cache = options.timing_cache or path.with_name("gprebn-edge.timing.cache")
    say(f"building the TensorRT {options.precision} engine {path.name}")
    try:
        return build_engine(onnx_file, path, precision=options.precision, batch=options.batch,
                             workspace_mb=options.workspace_mb, refittable=options.refittable, timing_cache=cache,
                             calibration=batches if options.precision == "int8" else None, progress=say)
    except GprebnError as e:
        raise GprebnError(f"{e} (the ONNX file {onnx_file} and its manifest were written and checked; no engine "
                          "was written)") from None
