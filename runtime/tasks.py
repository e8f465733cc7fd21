"""The runtime commands as library calls on model files: `bench_model` and `compare_models`. The CLI only
parses and prints; a script (the demo, a benchmark) calls these directly. Imports without torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gprebn_edge.consent import CodeConsent
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.source_base import ImageSource
from gprebn_edge.data.sources import collect, open_source
from gprebn_edge.errors import InputError
from gprebn_edge.runtime.base import CheckpointReader
from gprebn_edge.runtime.bench import BenchResult, benchmark
from gprebn_edge.runtime.compare import CompareResult, compare
from gprebn_edge.runtime.loading import model_metadata, open_runner
from gprebn_edge.validate import flag_number

if TYPE_CHECKING:
    from gprebn_edge.runtime.torch_runner import Prepare

__all__ = ["RunnerOptions", "parse_warmup", "parse_shape", "bench_model", "compare_models", "open_data"]

Progress = Callable[[str, int, int], None]


@dataclass
class RunnerOptions:
    """How to run a model file: backend ("auto" picks by suffix), device, threads, fp16, CUDA graphs."""

    backend: str = "auto"
    device: str | None = None
    threads: int | None = None
    fp16: bool = False
    cuda_graphs: bool = False
    input_shape: tuple[int, ...] | None = None
    shared_cpu: bool = False         # another runner or other work shares the CPU: no busy-waiting threads
    consent: CodeConsent | None = None  # to the model code a checkpoint names (see gprebn_edge/consent.py)
    verify: bool = True              # check an ONNX file or engine against its manifest's hash
    prepare: Prepare | None = None   # a checkpoint's model -> what was exported: the caller's fold (TorchRunner)
    providers: tuple[str, ...] | None = None  # onnxruntime providers in order, e.g. ("tensorrt", "cuda")
    engine_cache: Path | None = None  # where onnxruntime's TensorRT provider keeps engines and timing cache
    checkpoints: CheckpointReader | None = None  # reads a checkpoint: the adapt stage's, handed in (like prepare)

    def open(self, path: str | Path) -> Any:
        return open_runner(path, self.backend, device=self.device, threads=self.threads, fp16=self.fp16,
                           cuda_graphs=self.cuda_graphs, input_shape=self.input_shape, shared_cpu=self.shared_cpu,
                           consent=self.consent, verify=self.verify, prepare=self.prepare,
                           providers=self.providers, engine_cache=self.engine_cache, checkpoints=self.checkpoints)


def parse_warmup(text: str) -> tuple[int, float | None]:
    """`--warmup 10` (iterations) or `--warmup 2s` (seconds) -> (iterations, seconds or None)."""
    t = text.strip().lower()
    try:
        if t.endswith("s"):
            seconds = float(t[:-1])
            if seconds >= 0:
                return 1, seconds
        elif int(t) >= 0:
            return int(t), None
    except ValueError:
        pass
    raise InputError(f"--warmup must be a number of iterations (e.g. 10) or seconds (e.g. 2s), got {text!r}")


def parse_shape(text: str) -> tuple[int, ...]:
    """`3,224,224` -> (3, 224, 224): one image's C,H,W."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"--input-shape must be C,H,W with positive integers (e.g. 3,224,224), got {text!r}")
    return shape


def _preprocess_of(path: Path, checkpoints: CheckpointReader | None) -> Preprocess | None:
    meta = model_metadata(path, checkpoints)
    return Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else None


def open_data(spec: str, models: Sequence[str | Path], *, limit: int | None = None, seed: int = 0,
              checkpoints: CheckpointReader | None = None) -> ImageSource:
    """Open `spec` with the preprocessing the model files record (they must agree), in a seeded order;
    `checkpoints` reads those that are checkpoints."""
    found = {str(p): pre for p in models if (pre := _preprocess_of(Path(p), checkpoints)) is not None}
    distinct = {tuple(sorted(pre.to_dict().items(), key=lambda kv: kv[0])): p for p, pre in found.items()}
    if len(distinct) > 1:
        a, b = list(distinct.values())[:2]
        raise InputError(f"{a} and {b} record different preprocessing ({found[a].to_dict()} vs "
                         f"{found[b].to_dict()}): compare models exported for the same input")
    if not found:
        raise InputError(f"none of {', '.join(map(str, models))} records its preprocessing (an engine without its "
                         "export manifest beside it?): keep NAME.manifest.json next to the engine")
    return open_source(spec, next(iter(found.values())), shuffle=True, seed=seed, limit=limit)


def bench_model(path: str | Path, options: RunnerOptions, *, batches: Sequence[int] = (1,), warmup: str = "10",
                iters: int | None = None, duration: float | None = None, data: str | None = None,
                progress: Progress | None = None) -> list[BenchResult]:
    """Benchmark one model file at each batch size, on random inputs of the model's shape or, with `data`, on
    real images preprocessed as the model records. Each batch size loads the model afresh, so each result
    has its own load time and cold first call."""
    if not batches or min(batches) < 1:
        raise InputError(f"--batch must be positive integers, got {list(batches)}")
    warm_iters, warm_seconds = parse_warmup(warmup)
    inputs = None
    if data is not None:
        images, _ = collect(open_data(data, [path], limit=max(batches) * 4, checkpoints=options.checkpoints))
        inputs = images
    results = []
    for i, batch in enumerate(batches):
        def step(done: int, total: int, label: str = f"batch {batch} ({i + 1}/{len(batches)})") -> None:
            if progress is not None:
                progress(label, done, total)

        runner = options.open(path)  # benchmark() activates it (timing the load) and deactivates it
        results.append(benchmark(runner, batch=batch, warmup=warm_iters, warmup_seconds=warm_seconds, iters=iters,
                                 duration=duration, inputs=inputs, input_shape=options.input_shape, progress=step))
    return results


def compare_models(path_a: str | Path, path_b: str | Path, data: str, *, options_a: RunnerOptions | None = None,
                   options_b: RunnerOptions | None = None, batch: int = 32, limit: int | None = None,
                   latency_iters: int = 50, latency_batch: int = 1, seed: int = 0,
                   progress: Progress | None = None) -> CompareResult:
    """Compare two model files (any backend each) on the same data: accuracy, agreement, calibration and
    interleaved latency. Shapes and class counts are checked before any inference."""
    for value, flag, low in ((batch, "--batch", 1), (latency_batch, "--latency-batch", 1),
                             (latency_iters, "--latency-iters", 0)):
        flag_number(value, flag, low=low)
    options_a, options_b = options_a or RunnerOptions(), options_b or RunnerOptions()
    checkpoints = options_a.checkpoints or options_b.checkpoints
    source = open_data(data, [path_a, path_b], limit=limit, seed=seed, checkpoints=checkpoints)
    # two sessions alive at once: neither may spin on the cores the other one is being timed on
    a = replace(options_a, shared_cpu=True).open(path_a)
    b = replace(options_b, shared_cpu=True).open(path_b)
    names = (Path(path_a).name, Path(path_b).name)
    if names[0] == names[1]:
        names = (str(path_a), str(path_b))
    try:
        result = compare(a, b, source, batch=batch, latency_iters=latency_iters, latency_batch=latency_batch,
                         progress=progress, names=names)
    finally:
        a.deactivate()
        b.deactivate()
    health = {name: model_metadata(p, o.checkpoints).get("health")
              for name, p, o in zip(names, (path_a, path_b), (options_a, options_b), strict=True)}
    result.data = {**result.data, "spec": data, "limit": limit, "health": health}
    return result

