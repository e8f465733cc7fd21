"""`loop --publish DIR[:NAME]`: every model that passed its gates (and the one the loop starts serving),
written into a model repository in Triton Inference Server's layout (torch-free), so that a serving engine
that is not ours picks it up (docs/serving.md):

    DIR/NAME/config.pbtxt          platform onnxruntime_onnx (or tensorrt_plan), inputs/outputs of the export
    DIR/NAME/<version>/model.onnx  (or model.plan), versions 1, 2, ... increasing
    DIR/NAME/<version>/manifest.json   version, round, sha256 of the model file, its input/output, the export's
                                       manifest
    DIR/NAME/current.json          the newest version, its model and manifest (DeepStream, a user's reload)

A version is built in full under a hidden temporary name (files fsynced) and renamed into place, then
current.json is replaced atomically, then versions beyond the newest `keep` are renamed away and deleted: a
reader (or a kill at any moment) never sees a partial version. Leftovers of a killed publish are removed at
the next one. A failure (read-only, full or deleted folder) raises PublishError; the loop reports it and
serves on."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gprebn_edge.errors import GprebnError, InputError
from gprebn_edge.io import sha256_file, strict_json, write_text_atomic

__all__ = ["Publisher", "PublishError", "parse_publish", "config_pbtxt", "DEFAULT_NAME"]

DEFAULT_NAME = "gprebn"
_TMP, _OLD = ".tmp-", ".old-"
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                 "int32": "TYPE_INT32", "int64": "TYPE_INT64"}


class PublishError(GprebnError):
    """A model could not be published (the repository is left consistent)."""


def parse_publish(spec: str) -> tuple[Path, str]:
    """DIR[:NAME] -> (DIR, NAME); NAME is a plain folder name."""
    folder, sep, name = spec.rpartition(":")
    if not sep or "/" in name or not folder:
        folder, name = spec, DEFAULT_NAME
    if not name or name in (".", "..") or not all(c.isalnum() or c in "-_." for c in name):
        raise InputError(f"--publish {spec}: NAME must be a plain model name (letters, digits, - _ .)")
    return Path(folder), name


def _triton_type(dtype: str | None) -> str:
    return _TRITON_TYPES.get(dtype or "float32", "TYPE_FP32")


def _dims(shape: Any) -> str:
    return ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape)


def config_pbtxt(name: str, platform: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> str:
    """Triton's model configuration (protobuf text format). max_batch_size 0: the dims carry the (dynamic,
    -1) batch axis as the export declares it. Only the newest version is served."""
    def tensors(kind: str, items: list[dict[str, Any]]) -> list[str]:
        body = ",\n".join(f'  {{\n    name: "{t["name"]}"\n    data_type: {_triton_type(t.get("dtype"))}\n'
                          f"    dims: [ {_dims(t['shape'])} ]\n  }}" for t in items)
        return [f"{kind} [", body, "]"]

    return "\n".join([f'name: "{name}"', f'platform: "{platform}"', "max_batch_size: 0",
                      *tensors("input", inputs), *tensors("output", outputs),
                      "version_policy: { latest: { num_versions: 1 } }", ""])


@dataclass(frozen=True)
class Published:
    version: int
    round: int
    sha256: str


class Publisher:
    """The repository DIR/NAME; `publish` adds one version."""

    def __init__(self, spec: str, keep: int) -> None:
        folder, self.name = parse_publish(spec)
        self.root = folder / self.name
        self.keep = keep

    @property
    def current_file(self) -> Path:
        return self.root / "current.json"

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if p.name.isdecimal() and p.is_dir())

    def current(self) -> dict[str, Any] | None:
        try:
            raw = json.loads(self.current_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return raw if isinstance(raw, dict) else None

    def publish(self, model: Path, manifest: Path | None, round_id: int) -> Published | None:
        """Publish `model` (an ONNX file or engine) with its export `manifest`, served as round `round_id`;
        None when the newest version already is this very file (a resumed run)."""
        try:
            return self._publish(model, manifest, round_id)
        except OSError as e:
            raise PublishError(f"cannot publish round {round_id} to {self.root} ({e.strerror or e})") from None
        except GprebnError as e:
            raise PublishError(f"cannot publish round {round_id} to {self.root} ({e})") from None

    def _publish(self, model: Path, manifest: Path | None, round_id: int) -> Published | None:
        engine = model.suffix.lower() != ".onnx"
        export = json.loads(manifest.read_text(encoding="utf-8")) if manifest is not None and manifest.is_file() else {}
        sha = sha256_file(model)
        current = self.current()
        if current is not None and current.get("sha256") == sha and (self.root / str(current.get("version"))).is_dir():
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean()
        known = [*self.versions(), *([current["version"]] if current and isinstance(current.get("version"), int)
                                     else [])]
        version = max(known, default=0) + 1
        file_name = "model.plan" if engine else "model.onnx"
        tmp = self.root / f"{_TMP}{version}-{os.getpid()}"
        try:
            tmp.mkdir()
            copied = _copy_hashed(model, tmp / file_name)
            if copied != sha:
                raise PublishError(f"{model} changed while it was copied")
            record = {"version": version, "round": round_id, "model": file_name, "sha256": sha,
                      "input": export.get("input"), "output": export.get("output"), "published": time.time(),
                      "export": export}
            _write_synced(tmp / "manifest.json", strict_json(record, indent=1) + "\n")
            _fsync_dir(tmp)
            inputs, outputs = [export.get("input") or {}], [export.get("output") or {}]
            if inputs[0].get("name") and outputs[0].get("name"):
                text = config_pbtxt(self.name, "tensorrt_plan" if engine else "onnxruntime_onnx", inputs, outputs)
                config = self.root / "config.pbtxt"
                if not config.is_file() or config.read_text(encoding="utf-8") != text:
                    write_text_atomic(config, text)
            os.rename(tmp, self.root / str(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.root)
        write_text_atomic(self.current_file, strict_json(
            {"version": version, "round": round_id, "model": f"{version}/{file_name}",
             "manifest": f"{version}/manifest.json", "sha256": sha, "updated": time.time()}, indent=1) + "\n")
        self._prune()
        return Published(version, round_id, sha)

    def _clean(self) -> None:
        """Leftovers of a killed publish or prune: hidden, never a version."""
        for p in self.root.iterdir():
            if p.name.startswith((_TMP, _OLD)) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        for v in self.versions()[:-self.keep]:
            old = self.root / f"{_OLD}{v}"
            os.rename(self.root / str(v), old)  # gone from view at once, then deleted
            shutil.rmtree(old, ignore_errors=True)


def _copy_hashed(src: Path, dst: Path) -> str:
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return f"sha256:{h.hexdigest()}"


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
