"""`compare`: two runners on the same data. Accuracy, agreement, entropy, confidence and calibration from
one pass that feeds every batch to A then B; latency from interleaved A/B rounds on one real batch, so
drift (clocks, thermals, other load) hits both models alike. numpy only."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gprebn_edge.data.source_base import Batch, ImageSource
from gprebn_edge.errors import InputError
from gprebn_edge.io import write_text_atomic
from gprebn_edge.runtime import metrics
from gprebn_edge.runtime.base import Runner, TensorInfo
from gprebn_edge.runtime.loading import health_note

__all__ = ["ModelReport", "CompareResult", "compare", "write_json", "Progress"]

Progress = Callable[[str, int, int], None]  # (stage, done, total): "accuracy" in images, "latency" in rounds

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


@dataclass
class ModelReport:
    """One model's side of a comparison. Accuracy, error, ECE, per-class accuracy and the reliability bins
    are None without labels; a per-class entry is None where the data has no sample of that class."""

    name: str
    runner: dict[str, Any]
    mean_entropy: float
    mean_confidence: float
    predicted_classes: int
    accuracy: float | None = None
    error: float | None = None
    ece: float | None = None
    per_class_accuracy: list[float | None] | None = None
    reliability: dict[str, list] | None = None  # edges, confidence, accuracy (None where empty), count
    latency_ms: dict[str, float] | None = None  # p50, p90, mean, std, min


@dataclass
class CompareResult:
    """Both models' reports, their agreement (fraction of images with the same top-1 class) and the
    latency comparison (None when no latency rounds were run)."""

    models: list[ModelReport]
    agreement: float
    images: int
    num_classes: int
    input_shape: list[int | str | None]
    has_labels: bool
    data: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] | None = None

    @property
    def a(self) -> ModelReport:
        return self.models[0]

    @property
    def b(self) -> ModelReport:
        return self.models[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompareResult:
        return cls(**{**d, "models": [ModelReport(**m) for m in d["models"]]})

    def to_markdown(self) -> str:
        a, b = self.models
        head = [f"| | {_md(a.name)} | {_md(b.name)} |", "|---|---:|---:|"]
        rows: list[tuple[str, Callable[[ModelReport], str]]] = []
        if self.has_labels:
            rows += [("top-1 accuracy", lambda m: _pct(m.accuracy)), ("top-1 error", lambda m: _pct(m.error)),
                     (f"ECE ({len(a.reliability['count']) if a.reliability else metrics.DEFAULT_BINS} bins)",
                      lambda m: _num(m.ece))]
        rows += [("mean entropy (nats)", lambda m: _num(m.mean_entropy)),
                 ("mean confidence", lambda m: _num(m.mean_confidence)),
                 ("predicted classes", lambda m: f"{m.predicted_classes} / {self.num_classes}")]
        if self.latency is not None:
            batch = self.latency["batch"]
            rows += [(f"latency p50 (ms, batch {batch})", lambda m: _ms(m, "p50")),
                     ("latency p90 (ms)", lambda m: _ms(m, "p90")), ("latency mean (ms)", lambda m: _ms(m, "mean"))]
        lines = head + [f"| {label} | {fmt(a)} | {fmt(b)} |" for label, fmt in rows]
        lines += ["", f"Agreement (same top-1 class): {_pct(self.agreement)} of {self.images} images."]
        for name, health in (self.data.get("health") or {}).items():
            note = health_note(health)
            if note is not None:
                lines.append(f"Warning: {_md(name)}: {_md(note)}.")
        if self.latency is not None:
            lo, hi = self.latency["ratio_ci95"]
            lines.append(f"Latency {_md(b.name)} / {_md(a.name)} (median of paired ratios): "
                         f"{self.latency['ratio']:.3f}x "
                         f"(95 % bootstrap interval {lo:.3f}-{hi:.3f}x over {self.latency['rounds']} interleaved "
                         f"rounds).")
        if self.has_labels and a.per_class_accuracy is not None and b.per_class_accuracy is not None:
            if self.num_classes <= 20:
                names = self.data.get("class_names") or [str(c) for c in range(self.num_classes)]
                lines += ["", f"| class | {_md(a.name)} | {_md(b.name)} |", "|---|---:|---:|"]
                lines += [f"| {_md(str(names[c]) if c < len(names) else str(c))} | "
                          f"{_pct(a.per_class_accuracy[c])} | {_pct(b.per_class_accuracy[c])} |"
                          for c in range(self.num_classes)]
            else:
                lines += ["", "Per-class accuracy: see the JSON report."]
        return "\n".join(lines) + "\n"


def write_json(result: CompareResult, path: str | Path) -> None:
    """Write the result as JSON, atomically."""
    from gprebn_edge.io import strict_json

    write_text_atomic(path, strict_json(result.to_dict(), indent=2, default=str) + "\n")  # NaN/inf: null


def compare(runner_a: Runner, runner_b: Runner, source: ImageSource, *, batch: int = 32,
            latency_iters: int = 50, latency_batch: int = 1, latency_warmup: int = 5, labels: bool = True,
            progress: Progress | None = None, names: tuple[str, str] = ("A", "B")) -> CompareResult:
    """Compare two runners on every image of `source`.

    Before any inference, both models' inputs (non-batch dimensions, where static), class counts and the
    data's image shape must agree, else InputError. Runners not yet active are activated here and
    deactivated at the end. Accuracy metrics use the labels when `labels` is set and the source has them.

    Latency: after `latency_warmup` calls each, `latency_iters` rounds on one fixed batch of the first
    `latency_batch` images, alternating the order A,B / B,A each round (ABBA) so an order effect cancels.
    The ratio is the median over rounds of B's time / A's time in that round (paired: the two calls are
    back to back, so drift and the slow latency modes of a busy CPU cancel; a ratio of the two medians does
    not, and is reported beside it); its spread is a 95 % percentile bootstrap interval over the rounds,
    1000 resamples with a fixed seed, hence reproducible for the same timings. `latency_iters=0` skips it.
    """
    if batch < 1 or latency_batch < 1:
        raise InputError(f"batch sizes must be at least 1, got batch={batch}, latency batch={latency_batch}")
    if latency_iters < 0 or latency_warmup < 0:
        raise InputError(f"latency iterations must be non-negative, got {latency_iters} (warm-up {latency_warmup})")
    if len(names) != 2:
        raise InputError(f"give the two models two names, got {names}")
    if len(source) == 0:
        raise InputError(f"no images to compare on in {source.spec}")
    if latency_iters and len(source) < latency_batch:
        raise InputError(f"the latency batch of {latency_batch} needs at least as many images; {source.spec} "
                         f"has {len(source)}: pass a smaller latency batch")
    runners = (runner_a, runner_b)
    with contextlib.ExitStack() as stack:
        for r in runners:
            if not r.active:
                r.activate()
                stack.callback(r.deactivate)
        (in_a, out_a), (in_b, out_b) = (_io(r, n) for r, n in zip(runners, names, strict=True))
        input_shape = _check_models(in_a, in_b, out_a, out_b, names)
        statics = (_static_batch(in_a), _static_batch(in_b))
        for s, n in zip(statics, names, strict=True):
            if latency_iters and s is not None and s != latency_batch:
                raise InputError(f"{n} has a fixed batch size of {s}: pass a latency batch of {s}")
        it = iter(source.batches(batch))
        first = next(it, None)
        if first is None:
            raise InputError(f"no readable images to compare on in {source.spec}")
        data_shape = tuple(first.images.shape[1:])
        if any(isinstance(d, int) and d != x for d, x in zip(input_shape, data_shape, strict=True)):
            raise InputError(f"the data's images are {_shape(('batch', *data_shape))} but the models expect "
                             f"{_shape(('batch', *input_shape))}: set the preprocessing (resize/crop) to match")
        num_classes = _classes(out_a) or _classes(out_b)
        use_labels = labels and source.has_labels
        passes = _AccuracyPass(names, num_classes, use_labels)
        lat_images: list[np.ndarray] = []
        have = 0
        total = len(source)
        for b in _chain(first, it):
            passes.add(b, [_infer(r, b.images, s, n) for r, s, n in zip(runners, statics, names, strict=True)])
            if have < latency_batch:
                lat_images.append(b.images[: latency_batch - have])
                have += len(lat_images[-1])
            if progress is not None:
                progress("accuracy", passes.n, total)
        reports = passes.reports([r.info() for r in runners])
        latency = None
        if latency_iters:
            if have < latency_batch:
                raise InputError(f"only {have} readable images for a latency batch of {latency_batch}: pass a "
                                 f"smaller latency batch")
            fixed = np.ascontiguousarray(np.concatenate(lat_images))
            times = _time_rounds(runners, fixed, latency_iters, latency_warmup, progress)
            for rep, t in zip(reports, times, strict=True):
                rep.latency_ms = _summary(t)
            latency = _ratio(times, latency_batch, latency_warmup)
    return CompareResult(models=reports, agreement=passes.agreement, images=passes.n,
                         num_classes=passes.num_classes or 0, input_shape=list(data_shape), has_labels=use_labels,
                         data=source.describe(), latency=latency)


class _AccuracyPass:
    """Per-sample predictions, confidences and entropies of both models, gathered batch by batch (the
    logits themselves are not kept, so memory stays small on large data)."""

    def __init__(self, names: tuple[str, str], num_classes: int | None, use_labels: bool) -> None:
        self.names = names
        self.num_classes = num_classes
        self.use_labels = use_labels
        self.pred: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        self.conf: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        self.ent: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        self.labels: list[np.ndarray] = []
        self.n = 0

    def add(self, batch: Batch, logits: list[np.ndarray]) -> None:
        n = len(batch.images)
        for k, (out, name) in enumerate(zip(logits, self.names, strict=True)):
            c = out.shape[1] if out.ndim == 2 else None
            if out.shape[0] != n or c is None or (self.num_classes is not None and c != self.num_classes):
                want = f"({n}, {self.num_classes or 'classes'})"
                other = f"; {self.names[0]} gave {logits[0].shape}" if k == 1 else ""
                raise InputError(f"{name} returned logits of shape {out.shape} for {n} images, expected "
                                 f"{want}{other}: the models must classify into the same classes")
            self.num_classes = c
            metrics.check_logits(out, f"logits of {name}")
            self.pred[k].append(out.argmax(axis=1))
            self.conf[k].append(metrics.confidence(out))
            self.ent[k].append(metrics.entropy(out))
        if self.use_labels:
            assert batch.labels is not None and self.num_classes is not None
            if len(batch.labels) and (batch.labels.min() < 0 or batch.labels.max() >= self.num_classes):
                raise InputError(f"the data has labels up to {batch.labels.max()} but the models have "
                                 f"{self.num_classes} classes: the data's classes must be the models' classes")
            self.labels.append(batch.labels)
        self.n += n

    @property
    def agreement(self) -> float:
        return float((np.concatenate(self.pred[0]) == np.concatenate(self.pred[1])).mean())

    def reports(self, infos: list[Any]) -> list[ModelReport]:
        assert self.num_classes is not None
        c = self.num_classes
        labels = np.concatenate(self.labels) if self.use_labels else None
        out = []
        for k, name in enumerate(self.names):
            pred = np.concatenate(self.pred[k])
            conf = np.concatenate(self.conf[k])
            ent = np.concatenate(self.ent[k])
            rep = ModelReport(name=name, runner=asdict(infos[k]), mean_entropy=float(ent.mean()),
                              mean_confidence=float(conf.mean()),
                              predicted_classes=int((np.bincount(pred, minlength=c) > 0).sum()))
            if labels is not None:
                per_class = metrics.per_class_accuracy_from_predictions(pred, labels, c)
                rel = metrics.reliability_from_confidence(conf, pred == labels)
                rep.accuracy = float((pred == labels).mean())
                rep.error = 1.0 - rep.accuracy
                rep.ece = rel.ece
                rep.per_class_accuracy = _nan_to_none(per_class)
                rep.reliability = {"edges": rel.edges.tolist(), "confidence": _nan_to_none(rel.confidence),
                                   "accuracy": _nan_to_none(rel.accuracy), "count": rel.count.tolist()}
            out.append(rep)
        return out


def _io(runner: Runner, name: str) -> tuple[TensorInfo, TensorInfo]:
    ins, outs = runner.inputs(), runner.outputs()
    if len(ins) != 1 or not outs:
        raise InputError(f"{name} has {len(ins)} inputs and {len(outs)} outputs: compare needs a classifier "
                         f"with one image input and a logits output")
    if len(ins[0].shape) != 4:
        raise InputError(f"{name} takes input {ins[0].name!r} of shape {_shape(ins[0].shape)}: compare needs "
                         f"images (batch, channels, height, width)")
    return ins[0], outs[0]


def _check_models(in_a: TensorInfo, in_b: TensorInfo, out_a: TensorInfo, out_b: TensorInfo,
                  names: tuple[str, str]) -> tuple[int | str | None, ...]:
    """The non-batch input dimensions (static where either model fixes them); InputError on a mismatch."""
    dims = []
    for da, db in zip(in_a.shape[1:], in_b.shape[1:], strict=True):
        if isinstance(da, int) and isinstance(db, int) and da != db:
            raise InputError(f"the models take different inputs: {names[0]} {_shape(in_a.shape)}, {names[1]} "
                             f"{_shape(in_b.shape)}")
        dims.append(da if isinstance(da, int) else db)
    ca, cb = _classes(out_a), _classes(out_b)
    if ca is not None and cb is not None and ca != cb:
        raise InputError(f"the models have different outputs: {names[0]} {_shape(out_a.shape)}, {names[1]} "
                         f"{_shape(out_b.shape)} ({ca} vs {cb} classes)")
    return tuple(dims)


def _classes(out: TensorInfo) -> int | None:
    last = out.shape[-1] if out.shape else None
    return last if isinstance(last, int) else None


def _static_batch(info: TensorInfo) -> int | None:
    first = info.shape[0]
    return first if isinstance(first, int) else None


def _infer(runner: Runner, images: np.ndarray, static: int | None, name: str) -> np.ndarray:
    """Run `images`; for a model with a fixed batch size, in chunks of that size, the last one padded by
    repeating its final image (the padding's outputs are dropped)."""
    if static is None or static == len(images):
        return np.asarray(runner.infer(images))
    outs = []
    for i in range(0, len(images), static):
        chunk = images[i:i + static]
        n = len(chunk)
        if n < static:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], static - n, axis=0)])
        outs.append(np.asarray(runner.infer(chunk))[:n])
    return np.concatenate(outs)


def _chain(first: Batch, rest: Iterator[Batch]) -> Iterator[Batch]:
    yield first
    yield from rest


def _time_rounds(runners: tuple[Runner, Runner], images: np.ndarray, rounds: int, warmup: int,
                 progress: Progress | None) -> np.ndarray:
    """(2, rounds) milliseconds, A and B alternating which goes first."""
    for _ in range(warmup):
        for r in runners:
            r.infer(images)
    times = np.zeros((2, rounds))
    for i in range(rounds):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            runners[k].infer(images)  # synchronized by the Runner contract
            times[k, i] = (time.perf_counter() - start) * 1e3
        if progress is not None:
            progress("latency", i + 1, rounds)
    return times


def _summary(ms: np.ndarray) -> dict[str, float]:
    return {"p50": float(np.median(ms)), "p90": float(np.percentile(ms, 90)), "mean": float(ms.mean()),
            "std": float(ms.std()), "min": float(ms.min())}


def _ratio(times: np.ndarray, batch: int, warmup: int) -> dict[str, Any]:
    a, b = times
    rounds = len(a)
    paired = b / a  # one round's two calls are adjacent in time: their ratio cancels slow drift and modes
    idx = np.random.default_rng(BOOTSTRAP_SEED).integers(0, rounds, size=(BOOTSTRAP_RESAMPLES, rounds))
    boot = np.median(paired[idx], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"batch": batch, "rounds": rounds, "warmup": warmup, "order": "ABBA",
            "ratio": float(np.median(paired)), "ratio_ci95": [float(lo), float(hi)],
            "ratio_of_medians": float(np.median(b) / np.median(a)),
            "ratio_method": f"median over rounds of B/A (each round times A and B back to back, ABBA order); "
                            f"95 % percentile bootstrap over rounds, {BOOTSTRAP_RESAMPLES} resamples, seed "
                            f"{BOOTSTRAP_SEED}"}


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def _shape(shape: tuple[int | str | None, ...] | list[int | str | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _ms(m: ModelReport, key: str) -> str:
    return "-" if m.latency_ms is None else f"{m.latency_ms[key]:.3f}"
