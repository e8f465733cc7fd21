"""Model specs: build a model from `builtin:NAME`, `torchvision:NAME`, `path/to/file.py:factory` or
`package.module:factory`, load a plain state dict into it (read by weights.py, never unpickling arbitrary
objects), and check that it has BatchNorm layers GpreBN can adapt."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gprebn_edge.consent import FORMS as _FORMS
from gprebn_edge.consent import split_spec as _split
from gprebn_edge.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from gprebn_edge.errors import ArtifactError, MissingDependencyError, ModelError
from gprebn_edge.io import sha256_file
from gprebn_edge.models.builtin import BUILTIN_MODELS
from gprebn_edge.models.weights import apply_state_dict, read_state_dict
from gprebn_edge.validate import oneline

__all__ = [
    "BUILTIN_WEIGHTS_DIR",
    "ModelSpec",
    "LoadedModel",
    "build_model",
    "load_model",
    "read_state_dict",
    "apply_state_dict",
    "batchnorm_layers",
    "require_batchnorm",
]

BUILTIN_WEIGHTS_DIR = Path(__file__).parent / "weights"

# Builtins that may run with random weights when none are committed (speed and export measurements only).
_RANDOM_OK = {"resnet50_like"}
_IMAGENET = Preprocess(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_BUILTIN_PREPROCESS = {
    "small_resnet": Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
    "resnet50_like": _IMAGENET,
}
_counter = itertools.count()


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model: the spec (file paths made absolute), --num-classes, and the weights used."""

    spec: str
    num_classes: int | None = None
    weights: str | None = None
    weights_sha256: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> ModelSpec:
        if not isinstance(d, dict) or not isinstance(d.get("spec"), str):
            raise ArtifactError(f"model spec metadata must be a dict with a 'spec' string, got {d!r:.200}")
        return cls(spec=d["spec"], num_classes=d.get("num_classes"), weights=d.get("weights"),
                   weights_sha256=d.get("weights_sha256"))


@dataclass
class LoadedModel:
    """A model ready to adapt: eval mode, float32, on CPU, with its spec and default preprocessing."""

    model: nn.Module
    spec: ModelSpec
    preprocess: Preprocess


def _preprocess_attr(factory: Any, where: str) -> Preprocess | None:
    """A factory may carry its preprocessing as a `preprocess` attribute (a Preprocess or its dict)."""
    pre = getattr(factory, "preprocess", None)
    if pre is None or isinstance(pre, Preprocess):
        return pre
    if isinstance(pre, dict):
        try:
            return Preprocess.from_dict(pre)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{where}.preprocess is not a valid preprocessing dict ({oneline(e, typed=True)}): "
                             "give resize, crop, mean and std") from None
    return None


def _canonical(spec: str) -> str:
    """The spec with a model file's path made absolute, so the model can be rebuilt from anywhere."""
    kind, target, factory = _split(spec)
    if kind == "file":
        return f"{Path(target).expanduser().absolute()}:{factory}"
    return spec


def _build_builtin(name: str, num_classes: int | None) -> tuple[nn.Module, Preprocess]:
    factory = BUILTIN_MODELS.get(name)
    if factory is None:
        raise ModelError(f"unknown builtin model {name!r}: choose one of {', '.join(sorted(BUILTIN_MODELS))}")
    # Seeded so a builtin with random weights (resnet50_like) is the same model on every rebuild.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = factory(num_classes=num_classes) if num_classes else factory()
    pre = _preprocess_attr(factory, f"builtin:{name}") or _BUILTIN_PREPROCESS.get(name, Preprocess())
    return model, pre


def _installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(version unknown)"


def _build_torchvision(name: str, num_classes: int | None) -> tuple[nn.Module, Preprocess]:
    try:
        import torchvision
    except Exception as e:  # a broken install can raise RuntimeError or OSError, not just ImportError
        if "operator torchvision::" in str(e) and "does not exist" in str(e):
            # installed, but its compiled operators were built for another torch (PyPI's CUDA torchvision
            # beside a CPU torch): the extra is there, so naming it would not help
            raise MissingDependencyError(
                f"torchvision {_installed_version('torchvision')} was built for another torch than "
                f"{torch.__version__} ({oneline(e, typed=True)}); install a matching pair, e.g. "
                f"pip install torch==2.14.1 torchvision==0.29.1 on x86_64") from None
        raise MissingDependencyError(
            f"torchvision is not importable ({oneline(e, typed=True)}): pip install 'gprebn-edge[vision]'") from None
    kwargs = {"num_classes": num_classes} if num_classes else {}
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception as e:
        known = list(torchvision.models.list_models())
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5)
            hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
            raise ModelError(f"unknown torchvision model {name!r}: {hint}") from None
        raise ModelError(f"torchvision:{name} could not be built ({oneline(e, typed=True)})") from None
    return model, _IMAGENET


def _import_file(target: str) -> Any:
    path = Path(target).expanduser().absolute()
    if not path.is_file():
        if path.exists():
            raise ModelError(f"model file {target} is not a file")
        raise ModelError(f"model file {target} does not exist (working directory {Path.cwd()}): give the file's "
                         "path from the working directory, or an absolute path")
    name = f"_gprebn_user_model_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}_{next(_counter)}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelError(f"model file {target} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before running, as importlib's recipe says (dataclasses and pickling look it up);
    # the file's folder is on sys.path meanwhile so that it can import its sibling files.
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ModelError(f"model file {target} failed to import ({oneline(e, typed=True)})") from None
    finally:
        if str(path.parent) in sys.path:
            sys.path.remove(str(path.parent))
    return module


def _import_module(target: str) -> Any:
    try:
        return importlib.import_module(target)
    except Exception as e:
        raise ModelError(f"cannot import module {target!r} ({oneline(e, typed=True)}): use {_FORMS}") from None


def _call_factory(factory: Callable[..., Any], where: str, num_classes: int | None) -> nn.Module:
    if num_classes:
        try:
            params = inspect.signature(factory).parameters.values()
        except (TypeError, ValueError):  # builtins without a signature: just try the call
            params = None
        if params is not None and not any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in params):
            raise ModelError(f"{where} takes no num_classes argument: drop --num-classes or add "
                             "the parameter")
    try:
        model = factory(num_classes=num_classes) if num_classes else factory()
    except Exception as e:
        raise ModelError(f"{where} raised {oneline(e, typed=True)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{where} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(spec: str, num_classes: int | None = None) -> tuple[nn.Module, Preprocess]:
    """Build the model a spec names (no weights loaded, mode untouched) and its default preprocessing.

    `builtin:resnet50_like` and `torchvision:NAME` come with random weights; nothing is ever downloaded."""
    if num_classes is not None and num_classes <= 0:
        raise ModelError(f"--num-classes must be positive, got {num_classes}")
    kind, target, factory_name = _split(spec)
    if kind == "builtin":
        return _build_builtin(target, num_classes)
    if kind == "torchvision":
        return _build_torchvision(target, num_classes)
    module = _import_file(target) if kind == "file" else _import_module(target)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        own = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
               and getattr(v, "__module__", None) == module.__name__]
        listed = ", ".join(sorted(own)[:10]) or "none"
        raise ModelError(f"{target} has no callable {factory_name!r}; callables defined there: {listed}")
    where = f"factory {target}:{factory_name}"
    model = _call_factory(factory, where, num_classes)
    return model, _preprocess_attr(factory, where) or Preprocess()


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """(name, layer) for every BatchNorm layer (1d/2d/3d, SyncBatchNorm), in named_modules order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def require_batchnorm(model: nn.Module, spec: str) -> None:
    """Refuse a model GpreBN cannot adapt: no BatchNorm layers, or one without running statistics or
    affine parameters."""
    layers = batchnorm_layers(model)
    if not layers:
        raise ModelError(f"{spec} has no BatchNorm layers: GpreBN adapts BatchNorm statistics and affine "
                         "parameters, so there is nothing to adapt")
    for name, bn in layers:
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            raise ModelError(f"BatchNorm layer `{name}` has no running statistics "
                             "(track_running_stats=False): GpreBN needs the source statistics; "
                             "build it with track_running_stats=True")
        if not bn.affine:
            raise ModelError(f"BatchNorm layer `{name}` has no affine parameters (affine=False): "
                             "GpreBN adapts them; build it with affine=True")


def load_model(spec: str, weights: str | Path | None = None, num_classes: int | None = None) -> LoadedModel:
    """Build a model, load its weights and check it can be adapted; eval mode, float32, CPU.

    With no `weights`, a builtin uses its committed weights (BUILTIN_WEIGHTS_DIR/NAME.safetensors);
    `builtin:resnet50_like` has none and stays random (seeded), for speed and export measurements only.
    Other specs keep whatever weights their factory gives."""
    canonical = _canonical(spec)
    model, preprocess = build_model(canonical, num_classes)
    require_batchnorm(model, spec)  # before the weights: the clearer error for a model with no BatchNorm
    kind, target, _ = _split(canonical)
    if weights is None and kind == "builtin":
        committed = BUILTIN_WEIGHTS_DIR / f"{target}.safetensors"
        if committed.is_file():
            weights = committed
        elif target not in _RANDOM_OK:
            raise ModelError(f"no committed weights for builtin:{target}; pass --weights")
    weights_path = weights_sha = None
    if weights is not None:
        path = Path(weights).expanduser().absolute()
        apply_state_dict(model, read_state_dict(path), source=str(weights), spec=spec)
        weights_path, weights_sha = str(path), sha256_file(path)
    model = model.to(device="cpu", dtype=torch.float32).eval()
    return LoadedModel(model=model, spec=ModelSpec(canonical, num_classes, weights_path, weights_sha),
                       preprocess=preprocess)
