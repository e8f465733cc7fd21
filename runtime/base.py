"""The one runner interface over every backend (Polygraphy's runner shape: a context manager with
activate / infer / deactivate). Inputs and outputs are numpy arrays; this module imports without torch.

The base does what every backend needs: the lifecycle, the model's input/output description, and the input
checks (count, dtype, rank, fixed dimensions, batch size), each failing with one line that names the model,
the tensor and what to give. A backend implements `_activate`, `_describe_io`, `_infer`, `_deactivate` and
`info`."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from gprebn_edge.errors import ArtifactError, GprebnError, InputError

__all__ = ["TensorInfo", "RunnerInfo", "Runner", "CheckpointReader", "require_checkpoints"]


class CheckpointReader(Protocol):
    """How the runtime opens an adapted checkpoint (.safetensors): the layer above hands one in, as it hands
    in TorchRunner's `prepare`, so the runtime imports nothing of the adapt stage
    (gprebn_edge.stages.CHECKPOINTS is the adapt stage's)."""

    def metadata(self, path: Path) -> dict[str, Any]:
        """The checkpoint's metadata (ArtifactError for a bad file)."""
        ...

    def rebuild(self, path: Path, which: str, consent: Any) -> tuple[Any, dict[str, Any]]:
        """(the nn.Module of `which` model, "adapted" or "source", in eval mode; the metadata)."""
        ...


def require_checkpoints(checkpoints: CheckpointReader | None, path: Path) -> CheckpointReader:
    """`checkpoints`, or InputError saying that a checkpoint needs the adapt stage's reader."""
    if checkpoints is None:
        raise InputError(f"{path.name} is an adapted checkpoint, which the runtime opens only with the adapt "
                         "stage's reader: pass checkpoints=gprebn_edge.stages.CHECKPOINTS, or export it to ONNX "
                         "with `gprebn-edge export` and run that")
    return checkpoints

IO = tuple[list["TensorInfo"], list["TensorInfo"]]


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output: its name, shape (a str or None where dynamic, e.g. 'batch') and dtype."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str  # numpy dtype name, e.g. "float32"


@dataclass
class RunnerInfo:
    """What a runner says about itself, for reports: backend, device, precision and free-form details."""

    backend: str
    device: str
    precision: str = "fp32"
    details: dict[str, Any] = field(default_factory=dict)


def _shape_text(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class Runner(ABC):
    """Use as `with runner: logits = runner.infer(batch)`. `activate` loads the model and allocates what
    inference needs; `infer` takes one NCHW batch of real numbers (converted to the model's float input
    type) and returns the logits as a float32 numpy array, synchronized (ready when it returns);
    `deactivate` frees what `activate` took.

    Activating an active runner is an error (it would load the model twice, or hide a lifecycle bug);
    deactivating an inactive one does nothing, so cleanup code may always call it."""

    name: str = "runner"
    # whether it must be used on the thread that activated it (a CUDA/TensorRT context belongs to a thread);
    # a runner that is not may be activated on one thread and used on another (the device loop prepares a
    # candidate on its worker and serves it on the serving thread)
    thread_affine: bool = True

    def __init__(self) -> None:
        self._active = False
        self._io: IO | None = None  # the description read at activation

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.deactivate()

    def activate(self) -> None:
        if self._active:
            raise GprebnError(f"{self.label}: already active; call deactivate() first (or check runner.active)")
        try:
            self._activate()
            self._io = self._describe_io()
            if self._io is not None:
                self._check_io(*self._io)
        except BaseException:
            self._io = None
            with contextlib.suppress(Exception):  # the original error is the one to report
                self._deactivate()
            raise
        self._active = True

    def deactivate(self) -> None:
        if not self._active:
            return
        self._active = False
        try:
            self._deactivate()
        finally:
            self._io = None

    @property
    def active(self) -> bool:
        return self._active

    @property
    def label(self) -> str:
        """The model and the backend, for messages: "adapted.onnx (onnxruntime)"."""
        model = self._model_name()
        return f"{model} ({self.name})" if model else self.name

    def _model_name(self) -> str | None:
        path = getattr(self, "path", None)
        return getattr(path, "name", None)

    # -- inference --------------------------------------------------------------------------------
    def infer(self, batch: np.ndarray) -> np.ndarray:
        if not self._active:
            raise GprebnError(f"{self.label}: call infer() inside `with runner:` (or after activate())")
        return self._infer(self.check_batch(batch))

    def check_batch(self, batch: Any) -> np.ndarray:
        """`batch` as a C-contiguous array of the input's float type, or InputError saying what to give."""
        inputs = self.inputs()
        if len(inputs) != 1:
            raise InputError(f"{self.label} takes {len(inputs)} inputs {[t.name for t in inputs]}: runners feed "
                             "one image batch")
        want = inputs[0]
        x = np.asarray(batch)
        if x.dtype.kind not in "fiu":
            raise InputError(f"{self.label}: input {want.name!r} takes numbers ({want.dtype}), got a {x.dtype} "
                             "array: pass the preprocessed images as float32")
        dtype = want.dtype if want.dtype in ("float16", "float32", "float64") else "float32"
        x = np.ascontiguousarray(x, dtype=dtype)
        shape = self._checked_shape(want)
        if shape is None:  # the rank is learnt from the first batch
            shape = ("batch", *(None,) * (x.ndim - 1)) if x.ndim else ("batch",)
        expected = _shape_text(want.shape)
        if x.ndim < 1 or x.ndim != len(shape):
            raise InputError(f"{self.label}: input {want.name!r} is {len(want.shape)}-d {expected}, got shape "
                             f"{list(x.shape)}: pass one batch of shape {expected}")
        for axis, (got, fixed) in enumerate(zip(x.shape, shape, strict=True)):
            if isinstance(fixed, int) and fixed >= 0 and got != fixed:
                if axis == 0:
                    raise InputError(f"{self.label} was exported with a fixed batch of {fixed}, got {got} images: "
                                     f"pass batches of exactly {fixed} (or re-export with a dynamic batch)")
                raise InputError(f"{self.label}: input {want.name!r} is {expected}, got shape {list(x.shape)}: "
                                 f"preprocess the images to {expected[1:-1]} (dimension {axis} must be {fixed})")
        return x

    def _checked_shape(self, want: TensorInfo) -> tuple[int | str | None, ...] | None:
        """The shape batches are checked against: the input's own; None where even the rank is not known
        yet (a backend that learns it from the first batch)."""
        return want.shape

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """One checked batch (see check_batch) -> float32 logits, synchronized."""

    def _deactivate(self) -> None:
        return None

    # -- description ------------------------------------------------------------------------------
    def _describe_io(self) -> IO | None:
        """(inputs, outputs) of the model, or None where they are not known (not loaded). Called after
        `_activate` (the result is kept while active) and, while inactive, by inputs() and outputs()."""
        return None

    def _check_io(self, inputs: list[TensorInfo], outputs: list[TensorInfo]) -> None:
        if len(inputs) != 1 or not outputs:
            raise ArtifactError(f"{self.label} has inputs {[t.name for t in inputs]} and outputs "
                                f"{[t.name for t in outputs]}: runners take one image batch in and give logits out")

    def _refresh_io(self) -> None:
        """Re-read the description (for a backend whose shapes are learnt from the first batch)."""
        if self._active:
            self._io = self._describe_io()

    def _known_io(self) -> IO:
        io = self._io if self._io is not None else self._describe_io()
        if io is None:
            raise InputError(f"{self.label}: the model's inputs and outputs are known once it is loaded: use "
                             "`with runner:` first")
        return io

    def inputs(self) -> list[TensorInfo]:
        return list(self._known_io()[0])

    def outputs(self) -> list[TensorInfo]:
        return list(self._known_io()[1])

    @abstractmethod
    def info(self) -> RunnerInfo: ...
