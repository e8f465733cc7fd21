"""The export stage as one library call: adapted checkpoint -> folded ONNX (+ TensorRT engine) + manifest.

Folding happens in PyTorch (fold.py, torch.fx) where it can be proven there, then in the exported ONNX graph
for the BatchNorms left (onnx_fold.py); a model torch.fx cannot trace is exported with its BatchNorms and
folded in the ONNX graph only. The manifest says, per BN, where it was folded or why it was kept. Precision is
the ONNX file's (precision.py): fp16 and int8 files are made from the checked float32 export and checked
against PyTorch fp32 in turn. Where an engine is asked for, TensorRT (and Polygraphy) are checked before any
work, so a machine without them fails at once and writes nothing."""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gprebn_edge import __version__
from gprebn_edge.checkpoint import rebuild_model
from gprebn_edge.consent import CodeConsent
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import open_source
from gprebn_edge.errors import GprebnError, InputError
from gprebn_edge.export.fold import FoldReport, UntraceableModelError, fold_batchnorm
from gprebn_edge.export.onnx_export import DEFAULT_OPSET, Parity, export_onnx, onnx_parity
from gprebn_edge.export.onnx_fold import export_folded_onnx_fallback
from gprebn_edge.export.precision import FLOORS, MIN_INT8_IMAGES, PRECISIONS, check_floor, to_fp16, to_int8
from gprebn_edge.io import atomic_path, sha256_file, strict_json, write_text_atomic
from gprebn_edge.optional import import_polygraphy, import_tensorrt
from gprebn_edge.runtime.loading import manifest_beside

__all__ = ["EngineOptions", "export_artifact", "export_model", "default_onnx_path", "default_engine_path",
           "require_tensorrt", "CHECK_BATCH"]

CHECK_BATCH = 32  # images per forward of the parity check (at 250, PyTorch and onnxruntime held ~5 GB on
                  # EfficientNet-Lite0 at 224x224: the loop's start peaked there, whatever --max-memory said)

def default_onnx_path(artifact: Path, unadapted: bool, precision: str = "fp32") -> Path:
    """adapted.onnx, adapted-unadapted.onnx, adapted-fp16.onnx, adapted-unadapted-int8.onnx, ..."""
    suffix = "" if precision == "fp32" else f"-{precision}"
    return artifact.with_name(artifact.stem + ("-unadapted" if unadapted else "") + suffix + ".onnx")


def default_engine_path(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".engine")


@dataclass
class EngineOptions:
    """What `export --trt` builds from the ONNX file, strongly typed (its precision is the file's): the
    (min, opt, max) batch of the optimization profile, the REFIT flag, and where the engine and the timing
    cache go (defaults: the ONNX path with .engine, and gprebn-edge.timing.cache beside the engine)."""

    engine: Path | None = None
    batch: tuple[int, int, int] = (1, 1, 32)
    refittable: bool = False
    workspace_mb: int = 1024
    timing_cache: Path | None = None




def require_tensorrt() -> None:
    """Fail early, before any work, where TensorRT or Polygraphy is not importable."""
    import_tensorrt()
    import_polygraphy()


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
                    consent: CodeConsent | None = None, precision: str = "fp32",
                    check_batch: int = CHECK_BATCH) -> dict[str, Any]:
    """Fold the adapted (or, with `unadapted`, the source) model of `artifact`, export it to ONNX in
    `precision`, check onnxruntime against PyTorch fp32 on up to `check_images` real images (`data`, default:
    the artifact's own calibration data; int8 calibrates on them too and needs `data`; `check_batch` images per
    forward) and write the ONNX file
    and its manifest atomically; with `engine`, also build a TensorRT engine from that ONNX file. Model code
    the artifact names is imported only with `consent` (see gprebn_edge.consent). Returns the manifest."""
    say = progress or (lambda _: None)
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and data is None:
        raise InputError(f"--int8 calibrates on the site's images: pass --data IMAGES (at least {MIN_INT8_IMAGES})")
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
    batches = [b.images for b in source.batches(check_batch)]
    if not batches:
        raise GprebnError(f"no readable images in {spec} to check the export against"
                          f"{'' if data else '; pass --data'}")
    if precision == "int8" and (n := sum(len(b) for b in batches)) < MIN_INT8_IMAGES:
        raise InputError(f"--int8 needs at least {MIN_INT8_IMAGES} calibration images, {spec} gave {n}"
                         f"{' (raise --check-images)' if n == check_images else ''}")
    out = Path(onnx_path) if onnx_path is not None else default_onnx_path(artifact, unadapted, precision)
    manifest = export_model(model, meta, out, batches, which=which, artifact=artifact, data=spec, opset=opset,
                            progress=say, precision=precision)
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    if engine is not None:
        manifest["tensorrt"] = _build_engine(out, engine, say)
        manifest["seconds"] = round(time.perf_counter() - start, 2)
        write_text_atomic(manifest_beside(out), strict_json(manifest, indent=1) + "\n")
    return manifest


def export_model(model: torch.nn.Module, meta: dict[str, Any], out: Path, batches: list[np.ndarray], *,
                 which: str = "adapted", artifact: Path | None = None, data: str = "in-memory images",
                 opset: int = DEFAULT_OPSET, progress: Callable[[str], None] | None = None,
                 precision: str = "fp32") -> dict[str, Any]:
    """Fold an eval-mode model of an artifact (its metadata `meta`), export it to `out`, check parity on
    `batches` (float32 NCHW) and write the ONNX file and its manifest atomically. Returns the manifest.
    `export_artifact` and the device loop (which exports models it adapted in memory) both end here.

    fp16/int8: the float32 export is made and checked in a temporary folder first, then converted (int8
    calibrates on `batches`); the converted file is checked against PyTorch fp32 and written with its
    manifest even when below its floor, and PrecisionBelowFloor (naming the file) is raised after."""
    if precision != "fp32":
        with tempfile.TemporaryDirectory(prefix="gprebn-export-") as tmp:
            fp32 = Path(tmp) / out.name
            manifest = export_model(model, meta, fp32, batches, which=which, artifact=artifact, data=data,
                                    opset=opset, progress=progress)
            return _reduced(model, manifest, fp32, out, batches, precision, progress)
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
        "onnx": str(out), "onnx_sha256": sha256_file(out), "precision": "fp32", "model": which,
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
        write_text_atomic(manifest_beside(out), strict_json(manifest, indent=1) + "\n")
    except BaseException:  # an ONNX file without its manifest is a partial export: remove it
        out.unlink(missing_ok=True)
        raise
    return manifest


def _reduced(model: torch.nn.Module, fp32_manifest: dict[str, Any], fp32: Path, out: Path,
             batches: list[np.ndarray], precision: str, progress: Callable[[str], None] | None) -> dict[str, Any]:
    """The fp16/int8 file made from the checked float32 export `fp32`, checked against PyTorch fp32 (the
    unfolded model: the check covers the fold too), written with its manifest; then the floor."""
    say = progress or (lambda _: None)
    start = time.perf_counter()
    say(f"converting to {precision} and checking it on {sum(len(b) for b in batches)} images")
    kept_float = truncated = None
    with atomic_path(out) as tmp:  # non-finite outputs (onnx_parity raises) leave nothing behind
        if precision == "fp16":
            truncated = to_fp16(fp32, tmp)
        else:
            kept_float = to_int8(fp32, tmp, batches)
        parity: Parity = onnx_parity(tmp, model.eval(), batches)
    parity.limit = FLOORS[precision].max_rel
    tool = ("onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)" if precision == "fp16" else
            "onnxruntime.quantization.quantize_static(QDQ, MinMax, symmetric, per-channel weights)")
    manifest = {**fp32_manifest, "onnx": str(out), "onnx_sha256": sha256_file(out), "precision": precision,
                "converter": tool, "parity": {"data": fp32_manifest["parity"]["data"], **parity.to_dict(),
                                              "reference": "PyTorch fp32"},
                "fp32_parity": fp32_manifest["parity"], "kept_float": kept_float,
                "fp16_values_moved_into_range": truncated,
                "seconds": round(fp32_manifest["seconds"] + time.perf_counter() - start, 2)}
    if precision == "fp16":
        import onnxconverter_common

        manifest["versions"] = {**manifest["versions"], "onnxconverter_common": onnxconverter_common.__version__}
    try:
        write_text_atomic(manifest_beside(out), strict_json(manifest, indent=1) + "\n")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    if kept_float:
        ops = ", ".join(f"{op} x{n}" for op, n in kept_float.items())
        say(f"kept in float (the quantizer has no int8 form for them): {ops}")
    check_floor(precision, parity.top1_agreement, parity.max_rel, out)
    return manifest


def _adaptation_health(meta: dict[str, Any], which: str) -> dict[str, Any] | None:
    """The adapt stage's health verdict and signals, for the adapted model of an artifact that has them."""
    summary = meta.get("summary")
    health = summary.get("health") if which == "adapted" and isinstance(summary, dict) else None
    if not isinstance(health, dict):
        return None
    return {"verdict": health.get("verdict"), "signals": health.get("signals", []),
            **({"reason": health["reason"]} if "reason" in health else {})}


def _build_engine(onnx_file: Path, options: EngineOptions, say: Callable[[str], None]) -> dict:
    from gprebn_edge.export.tensorrt_build import build_engine

    path = options.engine or default_engine_path(onnx_file)
    cache = options.timing_cache or path.with_name("gprebn-edge.timing.cache")
    say(f"building the TensorRT engine {path.name} from {onnx_file.name} (strongly typed)")
    try:
        return build_engine(onnx_file, path, batch=options.batch, workspace_mb=options.workspace_mb,
                            refittable=options.refittable, timing_cache=cache, progress=say)
    except GprebnError as e:
        raise GprebnError(f"{e} (the ONNX file {onnx_file} and its manifest were written and checked; no engine "
                          "was written)") from None
