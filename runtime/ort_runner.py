"""onnxruntime backend: one InferenceSession on the CPU, CUDA or TensorRT execution provider.

The GPU providers (onnxruntime-gpu, the `gpu` extra) are the second GPU route beside our TensorRT engines: they
take the fp32, fp16 and Q/DQ int8 ONNX files as they are. The TensorRT provider builds its engines itself
(strongly typed where no fp16/int8 flag is set, so it runs what the file says) and keeps them, with its
timing cache, in `engine_cache` when given (the device loop's state folder). A provider asked for that
onnxruntime cannot start is an error, not a silent fall back to the CPU.
NOT RUN on a GPU: onnxruntime-gpu is not installed on this project's machines (docs/gpu.md)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gprebn_edge.errors import ArtifactError, InputError, MissingDependencyError
from gprebn_edge.runtime.base import Runner, RunnerInfo, TensorInfo
from gprebn_edge.validate import oneline

__all__ = ["OnnxRuntimeRunner", "PROVIDERS", "import_onnxruntime", "parse_providers"]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}

# onnxruntime's element type strings -> numpy dtype names
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def import_onnxruntime() -> Any:
    """The `onnxruntime` module, or MissingDependencyError: "not installed" only when it is not there at all;
    an installed one that fails to import (a broken install, or a signal during its native initialization)
    is named as such."""
    try:
        import onnxruntime
    except ImportError as e:
        if importlib.util.find_spec("onnxruntime") is None:
            raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime "
                                         "(or 'gprebn-edge[gpu]' for onnxruntime-gpu)") from None
        raise MissingDependencyError(f"onnxruntime is installed but failed to import ({_first_line(e)}): "
                                     "reinstall it (pip install --force-reinstall onnxruntime)") from None
    return onnxruntime


def parse_providers(text: str) -> tuple[str, ...]:
    """`tensorrt,cuda` -> ("tensorrt", "cuda"): onnxruntime providers in the order to try them."""
    names = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in PROVIDERS]
    if not names or unknown:
        raise InputError(f"unknown onnxruntime provider(s) {unknown or '(none)'} in {text!r}: use one or more of "
                         f"{', '.join(PROVIDERS)}, comma-separated in the order to try them (e.g. tensorrt,cuda)")
    return names


def _first_line(e: BaseException) -> str:
    return oneline(e, 240)  # cut at a word, with an ellipsis


def _tensor_info(arg: Any) -> TensorInfo:
    shape = tuple(d if isinstance(d, int | str) else None for d in (arg.shape or ()))
    return TensorInfo(name=arg.name, shape=shape, dtype=_ORT_TYPES.get(arg.type, arg.type))


class OnnxRuntimeRunner(Runner):
    """Run an ONNX file with onnxruntime. `providers` is tried in order, e.g. ("tensorrt", "cuda") lets nodes
    TensorRT cannot take fall back to CUDA. `threads` sets intra-op threads (None: onnxruntime's default);
    `fp16` and `engine_cache` (a folder) apply to the TensorRT provider only. `spin` False stops the
    intra-op threads from busy-waiting after each run: needed where two sessions (or a session and other
    work) share the CPU, as in `compare` and the device loop; with spinning, the idle session's threads
    steal the cores the other one is timed on (measured: an ONNX file against itself came out 1.10x with a
    95 % interval of 0.66-1.50 with spinning, 1.001x (0.999-1.002) without)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, providers: Sequence[str] = ("cpu",), threads: int | None = None,
                 fp16: bool = False, engine_cache: str | Path | None = None, device_id: int = 0,
                 spin: bool = True) -> None:
        super().__init__()
        self.spin = spin
        self.path = Path(path)
        providers = tuple(providers)
        unknown = [p for p in providers if p not in PROVIDERS]
        if not providers or unknown:
            raise InputError(f"unknown onnxruntime provider(s) {unknown or '(none)'}: use one or more of "
                             f"{', '.join(PROVIDERS)}")
        if threads is not None and threads < 1:
            raise InputError(f"threads must be at least 1, got {threads}")
        if fp16 and "tensorrt" not in providers:
            raise InputError("fp16 with onnxruntime needs the tensorrt provider (the CPU and CUDA providers "
                             "run the fp32 graph as exported)")
        self.providers = providers
        # a CPU session may be created on one thread and run on another (onnxruntime's Run is thread-safe);
        # with a GPU provider it stays on its thread, like every CUDA context
        self.thread_affine = any(p != "cpu" for p in providers)
        self.threads = threads
        self.fp16 = fp16
        self.engine_cache = Path(engine_cache) if engine_cache is not None else None
        self.device_id = device_id
        self._session: Any = None

    def _provider_list(self, available: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
        missing = [p for p in self.providers if PROVIDERS[p] not in available]
        if missing:
            raise MissingDependencyError(
                f"onnxruntime here has no {', '.join(PROVIDERS[p] for p in missing)} (available: "
                f"{', '.join(available)}): pip install 'gprebn-edge[gpu]' (onnxruntime-gpu, in place of "
                "onnxruntime; the TensorRT provider also needs TensorRT's libraries)")
        out: list[tuple[str, dict[str, Any]]] = []
        for p in self.providers:
            options: dict[str, Any] = {}
            if p in ("cuda", "tensorrt"):
                options["device_id"] = self.device_id
            if p == "tensorrt":
                if self.fp16:  # TensorRT 10 only (11 removed the flag): prefer an fp16 ONNX (export --fp16)
                    options["trt_fp16_enable"] = True
                if self.engine_cache is not None:
                    self.engine_cache.mkdir(parents=True, exist_ok=True)
                    options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(self.engine_cache),
                                   trt_timing_cache_enable=True, trt_timing_cache_path=str(self.engine_cache))
            out.append((PROVIDERS[p], options))
        return out

    def _activate(self) -> None:
        ort = import_onnxruntime()
        if not self.path.is_file():
            raise InputError(f"no such ONNX file: {self.path}")
        providers = self._provider_list(ort.get_available_providers())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own pybind classes (InvalidProtobuf, Fail, ...)
            first = _first_line(e)
            if type(e).__name__ == "InvalidProtobuf" or "Protobuf parsing failed" in first:
                raise ArtifactError(f"{self.path} is not an ONNX model: {first}") from None
            raise ArtifactError(f"onnxruntime cannot load {self.path}: {first}") from None
        started = self._session.get_providers()
        dropped = [PROVIDERS[p] for p in self.providers if PROVIDERS[p] not in started]
        if dropped:  # onnxruntime logs the cause and carries on without the provider
            self._session = None
            raise MissingDependencyError(f"onnxruntime could not start {', '.join(dropped)} for {self.path.name} "
                                         f"(started: {', '.join(started)}): check that the CUDA, cuDNN and TensorRT "
                                         "libraries onnxruntime-gpu needs are installed and on the library path")

    def _describe_io(self) -> tuple[list[TensorInfo], list[TensorInfo]] | None:
        if self._session is None:
            return None
        return ([_tensor_info(a) for a in self._session.get_inputs()],
                [_tensor_info(a) for a in self._session.get_outputs()])

    def _deactivate(self) -> None:
        self._session = None

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        assert self._io is not None
        (want,), (out, *_) = self._io
        try:
            logits = self._session.run([out.name], {want.name: batch})[0]
        except Exception as e:  # sizes the description cannot tell surface as onnxruntime's InvalidArgument
            raise InputError(f"{self.label} rejected an input of shape {list(batch.shape)} "
                             f"(expects {list(want.shape)}): {_first_line(e)}") from None
        return np.asarray(logits, dtype=np.float32)

    def info(self) -> RunnerInfo:
        used = list(self._session.get_providers()) if self._session is not None else []
        gpu = any(p in self.providers for p in ("cuda", "tensorrt"))
        details: dict[str, Any] = {"path": str(self.path), "requested": list(self.providers),
                                   "providers": used, "threads": self.threads}
        if self.engine_cache is not None:
            details["engine_cache"] = str(self.engine_cache)
        return RunnerInfo(backend=self.name, device=f"cuda:{self.device_id}" if gpu else "cpu",
                          precision="fp16" if self.fp16 else "fp32", details=details)
