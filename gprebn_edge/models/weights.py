"""Weights files: read a plain state dict from .safetensors or a torch.save file (never unpickling
arbitrary objects), load it into a model after checking names and shapes, and hash the file."""

from __future__ import annotations

import contextlib
import io
import pickle
import pickletools
import threading
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gprebn_edge.errors import ModelError
from gprebn_edge.validate import oneline

__all__ = ["read_state_dict", "apply_state_dict"]

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def _names(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def _has_pickled_objects(path: Path) -> bool:
    """Whether the file parses as pickle data (torch zip or legacy format); opcodes are only scanned
    with pickletools, never executed. Tells a file of pickled objects from a corrupt one."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(member) if member else b""
        except (zipfile.BadZipFile, OSError, KeyError):
            return False
    else:
        data = path.read_bytes()
    stream, parsed = io.BytesIO(data), False
    try:
        while stream.tell() < len(data):
            for _ in pickletools.genops(stream):
                pass
            parsed = True
    except Exception:
        pass
    return parsed


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"state_dict": {...}}, {"model": {...}}, ... possibly nested
        if not isinstance(obj, dict) or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)]
        if len(inner) != 1:
            break
        obj = obj[inner[0]]
    if not isinstance(obj, dict):
        raise ModelError(f"{path} holds a {type(obj).__name__}, not a state dict: save model.state_dict()")
    if not obj:
        raise ModelError(f"{path} holds an empty state dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"{path} is not a plain state dict: {len(bad)} entries are not tensors "
                         f"({_names(bad)}); save model.state_dict()")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings on the main thread only: warnings.catch_warnings swaps the process-wide filter list,
    which another thread (the device loop's worker, which also reads weights) could see or undo halfway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch.save file, with `torch.load(weights_only=True)`:
    a file of arbitrary pickled objects is refused, never unpickled."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist" if not path.exists()
                         else f"weights file {path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path), device="cpu"), path)
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"{path} is not a readable safetensors file ({oneline(e, typed=True)})") from None
    try:
        with _quiet():  # torch warns about pickle protocols on files it then refuses
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if _has_pickled_objects(path):
            raise ModelError(f"{path} is not a plain state dict (it holds pickled Python objects, which "
                             "are never loaded): save model.state_dict() with torch.save or "
                             "safetensors") from None
        raise ModelError(f"{path} is not a readable weights file: expected a state dict saved with "
                         "torch.save or safetensors") from None
    except Exception as e:
        raise ModelError(f"{path} is not a readable weights file ({oneline(e, typed=True)}): expected a state dict "
                         "saved with torch.save or safetensors") from None
    return _unwrap(obj, path)


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                     spec: str | None = None) -> None:
    """Load `state` into `model` after checking names and shapes, failing in one line that lists the
    differences. Missing `num_batches_tracked` buffers alone are tolerated (older checkpoints lack them)."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing ({_names(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_names(unexpected)})" if unexpected else "",
                 f"{len(shapes)} shape mismatch ({_names(shapes, 2)})" if shapes else ""]
        target = spec or type(model).__name__
        raise ModelError(f"weights in {source} do not match {target}: "
                         f"{', '.join(p for p in parts if p)}; check --model/--num-classes")
    for k in own:
        if k not in state:  # a tolerated num_batches_tracked
            state[k] = own[k]
    model.load_state_dict(state, strict=True)
