"""PyTorch backend: the eager model (prepared as exported: BatchNorm folded), optionally replayed as a CUDA
graph; and `torch_threads`, the scoped setting of torch's process-wide thread count.

This module imports without torch; torch is imported when a runner is built. It does not import the export
stage: the fold comes in as `prepare` (see TorchRunner)."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gprebn_edge.errors import InputError, MissingDependencyError
from gprebn_edge.runtime.base import CheckpointReader, Runner, RunnerInfo, TensorInfo, require_checkpoints

if TYPE_CHECKING:
    from gprebn_edge.consent import CodeConsent

__all__ = ["Prepare", "TorchRunner", "import_torch", "torch_threads"]

Prepare = Callable[[Any, Any], tuple[Any, Any]]
"""(eval-mode module, example batch) -> (prepared module, report): the report a dict of lists or an object
with `to_dict()`, e.g. the export stage's fold_batchnorm (export/fold.py)."""


def import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("PyTorch is not installed: the torch backend and .safetensors checkpoints "
                                     "need it (pip install 'gprebn-edge[adapt]'); ONNX files and engines run "
                                     "without it") from None
    return torch


class _ThreadScopes:
    """The open `torch_threads` scopes of the process, oldest first. torch's intra-op thread count is
    process-wide: the newest open scope's count applies, and when the last one closes the count from
    before the first one is restored, whatever order the scopes close in."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[tuple[object, int]] = []
        self._before = 0

    def enter(self, torch: Any, threads: int) -> object:
        token = object()
        with self._lock:
            if not self._open:
                self._before = torch.get_num_threads()
            self._open.append((token, threads))
            torch.set_num_threads(threads)
        return token

    def exit(self, torch: Any, token: object) -> None:
        with self._lock:
            self._open = [(t, n) for t, n in self._open if t is not token]
            torch.set_num_threads(self._open[-1][1] if self._open else self._before)


_SCOPES = _ThreadScopes()


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op thread count at `threads` (None: leave it), then put it back."""
    if threads is None:
        yield
        return
    torch = import_torch()
    token = _SCOPES.enter(torch, threads)
    try:
        yield
    finally:
        _SCOPES.exit(torch, token)


class TorchRunner(Runner):
    """Run an nn.Module, or the model of an adapted checkpoint (`which`: "adapted" or "source"), in eval mode.

    `prepare` (module, example batch) -> (module, report) turns the model into what was exported, so timings
    compare with the ONNX/TensorRT runs: pass the export stage's fold_batchnorm (export/fold.py; the runtime
    does not import it). Without `prepare` the model runs as given (e.g. one the caller folded already);
    `folded=False` says so explicitly and refuses a `prepare`. Preparing traces the model on an example batch: of
    `input_shape` (C, H, W) when given, else of the checkpoint's crop size, else of the first batch passed to
    `infer` (then the first call also pays for it). `cuda_graphs` (CUDA only) captures the forward pass once
    per batch shape and replays it, re-capturing when the shape changes. `threads` sets torch's intra-op
    threads while active (torch_threads). `consent`: to the model code a checkpoint names (user code is not
    imported without it). `checkpoints` reads a checkpoint (runtime.base.CheckpointReader), handed in like
    `prepare`: gprebn_edge.stages.CHECKPOINTS."""

    name = "torch"

    def __init__(self, module_or_checkpoint: Any, *, device: str = "cpu", fp16: bool = False,
                 cuda_graphs: bool = False, folded: bool = True, which: str = "adapted",
                 input_shape: tuple[int, ...] | None = None, threads: int | None = None,
                 consent: CodeConsent | None = None, prepare: Prepare | None = None,
                 checkpoints: CheckpointReader | None = None) -> None:
        super().__init__()
        torch = import_torch()
        self.checkpoints: CheckpointReader | None = None
        if isinstance(module_or_checkpoint, str | Path):
            self.path: Path | None = Path(module_or_checkpoint)
            self.checkpoints = require_checkpoints(checkpoints, self.path)
            self._source: Any = None
        elif isinstance(module_or_checkpoint, torch.nn.Module):
            self.path = None
            self._source = module_or_checkpoint
        else:
            raise InputError(f"TorchRunner takes an nn.Module or a .safetensors checkpoint path, got "
                             f"{type(module_or_checkpoint).__name__}")
        if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
            raise InputError(f"torch device must be cpu, cuda or cuda:N, got {device!r}")
        if cuda_graphs and not device.startswith("cuda"):
            raise InputError("CUDA graphs need a CUDA device: use device='cuda', or drop cuda_graphs on the CPU")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise MissingDependencyError(f"torch {torch.__version__} sees no CUDA GPU: install a CUDA build of "
                                         "torch (on a Jetson, NVIDIA's JetPack wheel) or use device='cpu'")
        if which not in ("adapted", "source"):
            raise InputError(f"which must be 'adapted' or 'source', got {which!r}")
        if threads is not None and threads < 1:
            raise InputError(f"threads must be at least 1, got {threads}")
        if prepare is not None and not folded:
            raise InputError("prepare= is how the model gets folded: drop folded=False, or drop prepare")
        self.prepare: Prepare | None = prepare if folded else None
        self.device = device
        self.fp16 = fp16
        self.cuda_graphs = cuda_graphs
        self.folded = folded
        self.which = which
        self.threads = threads
        self.consent = consent
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self._model: Any = None
        self._meta: dict[str, Any] = {}
        self._fold_report: dict[str, Any] | None = None
        self._num_classes: int | None = None
        self._scope = contextlib.ExitStack()  # the thread setting, undone at deactivation
        self._graph: Any = None
        self._static_in: Any = None
        self._static_out: Any = None

    # -- lifecycle --------------------------------------------------------------------------------
    def _activate(self) -> None:
        torch = import_torch()
        if self.path is not None:
            assert self.checkpoints is not None
            if not self.path.is_file():
                raise InputError(f"no such checkpoint: {self.path}")
            model, self._meta = self.checkpoints.rebuild(self.path, self.which, self.consent)
            self._num_classes = self._meta.get("num_classes")
            crop = (self._meta.get("preprocess") or {}).get("crop")
            if self.input_shape is None and crop:
                self.input_shape = (3, int(crop), int(crop))
        else:
            model = copy.deepcopy(self._source)  # moving or casting must not change the caller's module
        self._scope.enter_context(torch_threads(self.threads))
        self._model = model.eval()
        if self.prepare is not None and self.input_shape is not None:
            self._prepare(torch.zeros((2, *self.input_shape)))
        elif self.prepare is None:
            self._to_device()

    def _prepare(self, example: Any) -> None:
        assert self.prepare is not None
        prepared, report = self.prepare(self._model.float().cpu(), example.float().cpu()[:2])
        self._model = prepared
        self._fold_report = dict(report.to_dict() if hasattr(report, "to_dict") else report or {})
        self._to_device()

    def _to_device(self) -> None:
        torch = import_torch()
        self._model = self._model.to(self.device, dtype=torch.float16 if self.fp16 else torch.float32).eval()
        self._model.requires_grad_(False)

    def _deactivate(self) -> None:
        torch = import_torch()
        self._model = self._graph = self._static_in = self._static_out = None
        self._scope.close()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # -- inference --------------------------------------------------------------------------------
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        torch = import_torch()
        x = torch.from_numpy(batch)
        if self._fold_report is None and self.prepare is not None:
            self.input_shape = tuple(x.shape[1:])
            self._prepare(x)
            self._refresh_io()
        x = x.to(self.device, dtype=torch.float16 if self.fp16 else torch.float32)
        with torch.inference_mode():
            if self.cuda_graphs:
                out = self._replay(x)
            else:
                out = self._model(x)
            result = out.float().cpu().numpy()  # .cpu() waits for the device
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        if result.ndim == 2 and self._num_classes != result.shape[1]:
            self._num_classes = int(result.shape[1])
            self._refresh_io()
        return result

    def _replay(self, x: Any) -> Any:
        """Copy into the static input, replay the captured graph; capture first for a new shape."""
        torch = import_torch()
        if self._static_in is None or self._static_in.shape != x.shape:
            self._graph = self._static_in = self._static_out = None
            static_in = x.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm up off the default stream, as capture requires
                for _ in range(3):
                    self._model(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._model(static_in)
            self._graph, self._static_in, self._static_out = graph, static_in, static_out
        self._static_in.copy_(x)
        self._graph.replay()
        return self._static_out

    # -- description ------------------------------------------------------------------------------
    def _describe_io(self) -> tuple[list[TensorInfo], list[TensorInfo]]:
        dims: tuple[int | str | None, ...] = self.input_shape or (None, None, None)
        return ([TensorInfo("input", ("batch", *dims), "float32")],
                [TensorInfo("logits", ("batch", self._num_classes), "float32")])

    def _checked_shape(self, want: TensorInfo) -> tuple[int | str | None, ...] | None:
        # any size an eager model takes; the rank once known (from input_shape or the first batch)
        return None if self.input_shape is None else ("batch", *(None,) * len(self.input_shape))

    def _model_name(self) -> str | None:
        return self.path.name if self.path is not None else type(self._source).__name__

    def info(self) -> RunnerInfo:
        torch = import_torch()
        details: dict[str, Any] = {"torch": torch.__version__, "folded": self.prepare is not None,
                                   "cuda_graphs": self.cuda_graphs, "threads": self.threads or torch.get_num_threads()}
        if self.path is not None:
            details.update(path=str(self.path), which=self.which)
        else:
            details["module"] = type(self._source).__name__
        if self._fold_report is not None:
            details["fold"] = {k: len(v) for k, v in self._fold_report.items()}
        if self.device.startswith("cuda"):
            details["gpu"] = torch.cuda.get_device_name(self.device)
        return RunnerInfo(backend=self.name, device=self.device, precision="fp16" if self.fp16 else "fp32",
                          details=details)
