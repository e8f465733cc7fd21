"""The one runner interface over every backend (Polygraphy's runner shape: a context manager with
activate / infer / deactivate). Inputs and outputs are numpy arrays; this module imports without torch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

from gprebn_edge.errors import GprebnError

__all__ = ["TensorInfo", "RunnerInfo", "Runner"]


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


class Runner(ABC):
    """Use as `with runner: logits = runner.infer(batch)`. `activate` loads the model and allocates what
    inference needs; `infer` takes one float32 NCHW batch and returns the logits as a float32 numpy
    array, synchronized (the result is ready when it returns); `deactivate` frees what `activate` took."""

    name: str = "runner"

    def __init__(self) -> None:
        self._active = False

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self._active:
            self._activate()
            self._active = True

    def deactivate(self) -> None:
        if self._active:
            self._active = False
            self._deactivate()

    @property
    def active(self) -> bool:
        return self._active

    # -- inference --------------------------------------------------------------------------------
    def infer(self, batch: np.ndarray) -> np.ndarray:
        if not self._active:
            raise GprebnError(f"{self.name}: call infer() inside `with runner:` (or after activate())")
        return self._infer(batch)

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray: ...

    def _deactivate(self) -> None:
        return None

    # -- description ------------------------------------------------------------------------------
    @abstractmethod
    def inputs(self) -> list[TensorInfo]: ...

    @abstractmethod
    def outputs(self) -> list[TensorInfo]: ...

    @abstractmethod
    def info(self) -> RunnerInfo: ...
