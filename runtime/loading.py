"""Open any model file as a Runner, choosing the backend by its suffix, and read the metadata that says
how to preprocess its inputs. Imports without torch (checkpoints import it when opened)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gprebn_edge.consent import CodeConsent
from gprebn_edge.errors import ArtifactError, InputError
from gprebn_edge.io import sha256_file
from gprebn_edge.runtime.base import CheckpointReader, Runner, require_checkpoints
from gprebn_edge.runtime.trt_runner import ENGINE_SUFFIXES
from gprebn_edge.validate import check, check_preprocess, oneline, optional

if TYPE_CHECKING:
    from gprebn_edge.runtime.torch_runner import Prepare

__all__ = ["BACKENDS", "SUFFIXES", "backend_for", "open_runner", "model_metadata", "health_note", "verify_file",
           "manifest_beside"]

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")
SUFFIXES = {".onnx": "onnxruntime", **dict.fromkeys(ENGINE_SUFFIXES, "tensorrt"), ".safetensors": "torch"}
_REEXPORT = "re-export the model with `gprebn-edge export`"
_ACCEPTED = ("an ONNX file (.onnx), a TensorRT engine (.engine, .plan, .trt) or an adapted checkpoint "
             "(.safetensors)")


def backend_for(path: str | Path, backend: str = "auto") -> str:
    """The backend that runs `path`: `backend` itself, or by suffix when "auto"."""
    path = Path(path)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if not path.is_file():
        raise InputError(f"no such model file: {path} (give {_ACCEPTED})")
    if backend != "auto":
        return backend
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"cannot tell how to run {path.name}: give {_ACCEPTED}, or pass the backend")
    return SUFFIXES[suffix]


def manifest_beside(path: str | Path) -> Path:
    """NAME.manifest.json beside NAME.onnx or NAME.engine: where export writes the manifest."""
    path = Path(path)
    return path.with_name(path.stem + ".manifest.json")


def verify_file(path: str | Path) -> bool:
    """Check an ONNX file or engine against the hash its export manifest (NAME.manifest.json beside it)
    records; ArtifactError, in one line naming both files and --no-verify, when they differ or the manifest
    is unreadable. True when checked; False when there is nothing to check against (no manifest, or a
    manifest that records no hash for this file)."""
    path = Path(path)
    manifest = manifest_beside(path)
    if not manifest.is_file():
        return False
    override = "re-export it, or pass --no-verify to run it anyway"
    try:
        raw = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read {manifest}, the manifest of {path.name} ({oneline(e)}): "
                            f"{override}") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{manifest}, the manifest of {path.name}, is not a JSON object: {override}")
    if path.suffix.lower() == ".onnx":
        expected = raw.get("onnx_sha256")
    else:  # an engine: export --trt records its hash, where the engine is the manifest's own
        trt = raw.get("tensorrt")
        named = isinstance(trt, dict) and Path(str(trt.get("engine", ""))).name == path.name
        expected = trt.get("engine_sha256") if named and isinstance(trt, dict) else None
    if expected is None:
        return False
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(f"{path} does not match its manifest {manifest} ({actual[:19]}... vs {str(expected)[:19]}"
                            f"...): it changed after export; {override}")
    return True


def _gpu_index(device: str) -> int:
    if device in ("cuda", "gpu"):
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise InputError(f"device must be cpu, cuda or cuda:N, got {device!r}")


def open_runner(path: str | Path, backend: str = "auto", *, device: str | None = None, threads: int | None = None,
                fp16: bool = False, cuda_graphs: bool = False, providers: tuple[str, ...] | None = None,
                engine_cache: str | Path | None = None, which: str = "adapted",
                input_shape: tuple[int, ...] | None = None, shared_cpu: bool = False,
                consent: CodeConsent | None = None, verify: bool = True, prepare: Prepare | None = None,
                checkpoints: CheckpointReader | None = None) -> Runner:
    """A (not yet activated) runner for `path`. `device` defaults to "cpu" for onnxruntime and torch and to
    "cuda" for TensorRT; for onnxruntime a CUDA device means the CUDA provider unless `providers` says
    otherwise (e.g. ("tensorrt", "cuda")). `which` and `input_shape` apply to checkpoints. `shared_cpu`:
    other work runs beside this runner (a second model, adaptation), so onnxruntime must not busy-wait.
    `consent`: to the model code a checkpoint names (ONNX files and engines run no code and need none).
    `verify`: check an ONNX file or engine against the hash in its manifest (see verify_file) first.
    `prepare`: for a checkpoint, turns the model into what was exported (pass the export stage's
    fold_batchnorm, or the runs are of the unfolded model; see TorchRunner). `checkpoints`: how to read a
    checkpoint (runtime.base.CheckpointReader; gprebn_edge.stages.CHECKPOINTS): the runtime does not import
    the adapt stage."""
    kind = backend_for(path, backend)
    if verify and kind in ("onnxruntime", "tensorrt"):
        verify_file(path)
    if kind == "onnxruntime":
        _onnx_proto(Path(path))  # external data checked before onnxruntime reads any of it
        from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner

        if cuda_graphs:
            raise InputError("CUDA graphs are offered by the torch and tensorrt backends, not onnxruntime")
        dev = device or "cpu"
        if providers is None:
            providers = ("cpu",) if dev == "cpu" else ("cuda",)
        return OnnxRuntimeRunner(path, providers=providers, threads=threads, fp16=fp16, engine_cache=engine_cache,
                                 device_id=0 if dev == "cpu" else _gpu_index(dev), spin=not shared_cpu)
    if providers is not None or engine_cache is not None:
        raise InputError("providers and engine_cache are onnxruntime settings: use them with an .onnx file")
    if kind == "tensorrt":
        from gprebn_edge.runtime.trt_runner import TensorRTRunner

        dev = device or "cuda"
        if dev == "cpu":
            raise InputError("TensorRT engines run on the GPU: drop device='cpu', or run the .onnx file on the CPU")
        if threads is not None or fp16:
            raise InputError("threads and fp16 do not apply to a TensorRT engine (its precision was fixed when it "
                             "was built: rebuild with `gprebn-edge export ... --trt --fp16`)")
        return TensorRTRunner(path, cuda_graph=cuda_graphs, device_id=_gpu_index(dev))
    if kind == "torch":
        from gprebn_edge.runtime.torch_runner import TorchRunner

        dev = device or "cpu"
        if dev != "cpu":
            dev = f"cuda:{_gpu_index(dev)}"
        return TorchRunner(path, device=dev, fp16=fp16, cuda_graphs=cuda_graphs, which=which,
                           input_shape=input_shape, threads=threads, consent=consent, prepare=prepare,
                           checkpoints=checkpoints)
    raise AssertionError(kind)


def _onnx_proto(path: Path) -> Any:
    """The ONNX graph without its external data, whose references are checked: each file inside the model's
    folder, present, and large enough for the bytes it is said to hold."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ArtifactError(f"{path} is not an ONNX model: {oneline(e)}") from None
    folder = path.resolve().parent
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        where = f"{path}: initializer {tensor.name!r} keeps its data in {info.get('location', '')!r}"
        target = (folder / info.get("location", "")).resolve()
        if not info.get("location") or not target.is_relative_to(folder) or target == folder:
            raise ArtifactError(f"{where}, outside the model's folder: refused; keep the data file beside the "
                                ".onnx file and name it by a relative path")
        if not target.is_file():
            raise ArtifactError(f"{where}, which does not exist: copy it beside {path.name}")
        try:
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
        except ValueError:
            raise ArtifactError(f"{where} at a malformed offset or length: re-export the model") from None
        if end > target.stat().st_size:
            raise ArtifactError(f"{where}, which holds {target.stat().st_size} bytes, not the {end} it needs: "
                                "the data file is truncated or another model's; re-export the model")
    return proto


def _onnx_metadata(path: Path) -> dict[str, Any]:
    return {p.key: p.value for p in _onnx_proto(path).metadata_props}


def _json_field(raw: dict[str, Any], key: str, path: Path) -> Any:
    """raw[key], decoded where it is a JSON string (ONNX metadata values are strings)."""
    value = raw.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ArtifactError(f"{path}: its {key} metadata is not valid JSON") from None
    return value


def _parsed(raw: dict[str, Any], fmt: str, path: Path) -> dict[str, Any]:
    preprocess = _json_field(raw, "preprocess", path)
    check_preprocess({"preprocess": preprocess}, path, fix=_REEXPORT)
    num_classes = raw.get("num_classes")
    try:
        num_classes = int(num_classes) if num_classes is not None else None
    except (TypeError, ValueError):
        raise ArtifactError(f"{path}: its metadata field 'num_classes' is {str(num_classes)[:40]!r}, not a number: "
                            f"{_REEXPORT}") from None
    health = _json_field(raw, "adaptation_health", path)
    if health is not None and not (isinstance(health, dict) and isinstance(health.get("verdict"), str)):
        raise ArtifactError(f"{path}: its adaptation_health metadata has no verdict")
    return {"format": fmt, "model": raw.get("model"), "preprocess": preprocess, "num_classes": num_classes,
            "health": health, "raw": raw}


def health_note(health: dict[str, Any] | None) -> str | None:
    """One line for a model whose adaptation health check was not clean (None when it was, or for a model
    that was not adapted): the verdict and the signals, as `adapt` recorded them."""
    if not health or health.get("verdict") in ("ok", None):
        return None
    if health["verdict"] == "unchecked":
        return f"adaptation health unchecked: {health.get('reason', 'no held-back images')}"
    signals = "; ".join(str(s) for s in health.get("signals") or [])
    return f"adaptation health {health['verdict']}: {signals}"


def model_metadata(path: str | Path, checkpoints: CheckpointReader | None = None) -> dict[str, Any]:
    """What a model file says about itself: {"format", "model" ("adapted"/"source"/None), "preprocess"
    (a dict for Preprocess.from_dict, or None), "num_classes" (int or None), "raw"}. An engine carries no
    metadata of its own: its export manifest (NAME.manifest.json) or the ONNX file beside it is read."""
    path = Path(path)
    kind = backend_for(path)
    if kind == "onnxruntime":
        return _parsed(_onnx_metadata(path), "onnx", path)
    if kind == "torch":
        meta = require_checkpoints(checkpoints, path).metadata(path)
        meta = {k: v for k, v in meta.items() if k != "source_bn"}
        summary = meta.get("summary")
        health = summary.get("health") if isinstance(summary, dict) else None
        return _parsed({**meta, "model": "adapted", "model_spec": meta.get("model"), "adaptation_health": health},
                       "checkpoint", path)
    manifest = manifest_beside(path)
    if manifest.is_file():
        try:
            raw = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"cannot read {manifest}, the manifest of {path.name}: {oneline(e)}") from None
        check(raw, "manifest", dict, manifest, fix=_REEXPORT)
        shape = optional(raw, "output.shape", list, manifest, fix=_REEXPORT) or [None]
        num_classes = optional(raw, "num_classes", (int, str), manifest, fix=_REEXPORT) or shape[-1]
        return _parsed({**raw, "num_classes": raw.get("num_classes", num_classes)}, "engine", path)
    onnx_file = path.with_suffix(".onnx")
    if onnx_file.is_file():
        return {**_parsed(_onnx_metadata(onnx_file), "engine", path), "from": str(onnx_file)}
    return {"format": "engine", "model": None, "preprocess": None, "num_classes": None, "raw": {}}
