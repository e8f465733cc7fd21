"""The adapted checkpoint: a safetensors file whose tensors are a plain state dict of the user's own
architecture (BN running statistics = the adapted dataset-level statistics) and whose header metadata holds
one JSON document describing how it was made (docs/formats.md).

Anyone can `model.load_state_dict(safetensors.torch.load_file(path))` and run it in eval mode without this
package. The source BN tensors are kept, base64-encoded, in the metadata, so the unadapted model can be
rebuilt from the artifact alone (the other weights are unchanged by adaptation)."""

from __future__ import annotations

import base64
import binascii
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gprebn_edge.consent import CodeConsent, require_consent
from gprebn_edge.errors import ArtifactError
from gprebn_edge.io import atomic_path, strict_json
from gprebn_edge.validate import (
    check,
    check_preprocess,
    check_size,
    field,
    int_list,
    number,
    oneline,
    optional,
    require,
)

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "check_metadata", "encode_tensors", "decode_tensors",
           "source_state_dict", "rebuild_model"]

FORMAT = "gprebn-edge/adapted-checkpoint"
FORMAT_VERSION = 1
_META_KEY = "gprebn_edge"


def encode_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """JSON-able copies of small tensors (dtype, shape, little-endian base64 bytes)."""
    out = {}
    for name, t in tensors.items():
        a = t.detach().cpu().contiguous().numpy()
        out[name] = {"dtype": str(a.dtype), "shape": list(a.shape),
                     "data": base64.b64encode(a.astype(a.dtype.newbyteorder("<")).tobytes()).decode()}
    return out


def decode_tensors(encoded: Any, where: object = "the artifact") -> dict[str, torch.Tensor]:
    """The tensors encode_tensors wrote; ArtifactError naming `where` and the field for anything malformed."""
    if not isinstance(encoded, dict):
        require({"source_bn": encoded}, "source_bn", dict, where)
    out = {}
    for name, e in encoded.items():
        key = f"source_bn.{name}"
        entry = check(e, key, dict, where)
        dtype_name = require(entry, "dtype", str, where, prefix=f"{key}.")
        shape = int_list(entry, "shape", where, prefix=f"{key}.") or []
        data = require(entry, "data", str, where, prefix=f"{key}.")
        try:
            dtype = np.dtype(dtype_name)
        except TypeError:
            raise ArtifactError(f"{where}: its metadata field '{key}.dtype' is {dtype_name[:40]!r}, not a numeric "
                                "dtype: re-create the artifact") from None
        if dtype.kind not in "fiub" or any(n < 0 for n in shape):
            raise ArtifactError(f"{where}: its metadata field '{key}' has dtype {dtype} and shape {shape}: expected "
                                "a numeric tensor; re-create the artifact")
        check_size(math.prod(shape) * dtype.itemsize, f"{where}: the tensor {key}", "re-create the artifact")
        try:
            raw = base64.b64decode(data, validate=True)
            a = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)
        except (binascii.Error, ValueError) as err:
            raise ArtifactError(f"{where}: its metadata field '{key}.data' is not base64 of a {dtype} tensor of "
                                f"shape {shape} ({oneline(err, 80)}): re-create the artifact") from None
        out[name] = torch.from_numpy(a.astype(dtype).copy())
    return out


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write atomically; `metadata` must be JSON-serializable."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ArtifactError(f"checkpoint name must end in .safetensors, got {path.name}")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={_META_KEY: strict_json(meta, sort_keys=True)})
        except SafetensorError as e:  # safetensors reports a full disk as its own error, not OSError
            raise ArtifactError(f"cannot write {path}: {oneline(e)}") from None
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of an adapted checkpoint; ArtifactError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no such checkpoint: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        hint = "" if path.suffix == ".safetensors" else "; expected an adapted checkpoint from `gprebn-edge adapt`"
        raise ArtifactError(f"{path} is not a safetensors checkpoint ({oneline(e)}){hint}") from None
    if _META_KEY not in header:
        raise ArtifactError(f"{path} is a safetensors file but not a gprebn-edge checkpoint (no metadata)")
    try:
        meta = json.loads(header[_META_KEY])
    except json.JSONDecodeError:
        raise ArtifactError(f"{path}: its gprebn-edge metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: its gprebn-edge metadata is a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: unknown artifact format {meta.get('format')!r}")
    version = meta.get("format_version", 0)
    if not isinstance(version, int):
        raise ArtifactError(f"{path}: its format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path} was written by a newer gprebn-edge (format {meta['format_version']}):"
                            " upgrade gprebn-edge")
    check_metadata(meta, path)
    return state, meta


def check_metadata(meta: dict[str, Any], path: object) -> None:
    """The types of the fields this package reads, wherever they are present (a missing one is reported by
    whoever needs it): one ArtifactError naming the file and the field."""
    optional(meta, "model", dict, path)
    optional(meta, "model.spec", str, path)
    for name in ("num_classes", "model.num_classes"):
        if optional(meta, name, int, path) is not None:
            number(meta, name, path, integer=True, positive=True)
    check_preprocess(meta, path)
    optional(meta, "method", dict, path)
    if optional(meta, "method", dict, path) is not None:
        optional(meta, "method.seed", int, path)
    if optional(meta, "calibration", dict, path) is not None:
        optional(meta, "calibration.spec", str, path)
        optional(meta, "calibration.fingerprint", str, path)
        optional(meta, "calibration.skipped", int, path)
        optional(meta, "calibration.skipped_items", list, path)
    if optional(meta, "summary", dict, path) is not None:
        optional(meta, "summary.images", int, path)
        optional(meta, "summary.online_error", float, path)
        for key in ("calibration_before", "calibration_after"):
            if optional(meta, f"summary.{key}", dict, path) is not None:
                optional(meta, f"summary.{key}.entropy", float, path)
        if optional(meta, "summary.health", dict, path) is not None:
            optional(meta, "summary.health.verdict", str, path)
            optional(meta, "summary.health.signals", list, path)
    for i, row in enumerate(optional(meta, "statistics_shift", list, path) or []):
        check(row, f"statistics_shift[{i}]", dict, path)
        require(row, "layer", str, path, prefix=f"statistics_shift[{i}].")
        require(row, "mean_shift", float, path, prefix=f"statistics_shift[{i}].")
        require(row, "std_ratio", float, path, prefix=f"statistics_shift[{i}].")
    if optional(meta, "source_bn", dict, path) is not None:
        decode_tensors(meta["source_bn"], path)  # small (BatchNorm vectors); garbage fails here, named
    optional(meta, "created", str, path)
    optional(meta, "gprebn_edge_version", str, path)
    field(meta, "format_version", int, path, default=0)


def source_state_dict(state: dict[str, torch.Tensor], meta: dict[str, Any],
                      where: object = "the artifact") -> dict[str, torch.Tensor]:
    """The unadapted model's state dict: the adapted one with the source BN tensors put back."""
    source = dict(state)
    source.update(decode_tensors(meta["source_bn"], where))
    return source


def rebuild_model(path: str | Path, which: str = "adapted", *,
                  consent: CodeConsent | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the eval-mode model from the artifact: `which` is "adapted" or "source" (unadapted).

    A model built by user code (file.py:factory, module:factory) is built only with the user's `consent`
    to the code the artifact names: the artifact is data, and data never runs code (ModelError otherwise)."""
    from gprebn_edge.models.spec import ModelSpec, apply_state_dict, build_model

    if which not in ("adapted", "source"):
        raise ArtifactError(f"which must be 'adapted' or 'source', got {which!r}")
    state, meta = load_checkpoint(path)
    spec = ModelSpec.from_dict(meta.get("model"))  # ArtifactError when the metadata names no model
    require_consent(spec.spec, consent, str(path))  # before anything is imported
    if which == "source" and not isinstance(meta.get("source_bn"), dict):
        raise ArtifactError(f"{path} holds no source BatchNorm tensors: the unadapted model cannot be rebuilt "
                            "from it")
    model, _ = build_model(spec.spec, spec.num_classes)
    if which == "source":
        state = source_state_dict(state, meta, path)
    apply_state_dict(model, state, str(path))
    return model.eval(), meta
