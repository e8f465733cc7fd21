"""`compare`: two runners on the same data. Accuracy, agreement, entropy, confidence and calibration from
one pass that feeds every batch to A then B; latency from interleaved A/B rounds on one real batch, so
drift (clocks, thermals, other load) hits both models alike. numpy only."""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gprebn_edge.data.source_base import Batch, ImageSource
from gprebn_edge.errors import InputError
from gprebn_edge.io import strict_json, write_text_atomic
from gprebn_edge.runtime import metrics
from gprebn_edge.runtime.base import Runner, TensorInfo
from gprebn_edge.runtime.bench import time_interleaved
from gprebn_edge.runtime.loading import health_note
from gprebn_edge.runtime.tables import fmt_ms, fmt_num, fmt_pct, fmt_ratio, fmt_shape, md_escape, md_table
from gprebn_edge.validate import flag_number

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
    latency_ms: dict[str, float] | None = None  # metrics.latency_summary at p50, p90 over the rounds


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
        rows: list[tuple[str, Callable[[ModelReport], str]]] = []
        if self.has_labels:
            bins = len(a.reliability["count"]) if a.reliability else metrics.DEFAULT_BINS
            rows += [("top-1 accuracy", lambda m: fmt_pct(m.accuracy)), ("top-1 error", lambda m: fmt_pct(m.error)),
                     (f"ECE ({bins} bins)", lambda m: fmt_num(m.ece))]
        rows += [("mean entropy (nats)", lambda m: fmt_num(m.mean_entropy)),
                 ("mean confidence", lambda m: fmt_num(m.mean_confidence)),
                 ("predicted classes", lambda m: f"{m.predicted_classes} / {self.num_classes}")]
        if self.latency is not None:
            units = {"p50": f"ms, batch {self.latency['batch']}", "p90": "ms", "mean": "ms"}
            rows += [(f"latency {k} ({unit})", functools.partial(_latency_cell, key=k)) for k, unit in units.items()]
        lines = md_table(["", a.name, b.name], [[label, fmt(a), fmt(b)] for label, fmt in rows])
        lines += ["", f"Agreement (same top-1 class): {fmt_pct(self.agreement)} of {self.images} images."]
        for name, health in (self.data.get("health") or {}).items():
            note = health_note(health)
            if note is not None:
                lines.append(f"Warning: {md_escape(name)}: {md_escape(note)}.")
        if self.latency is not None:
            lines += _latency_lines(self.latency, a.name, b.name)
        if self.has_labels and a.per_class_accuracy is not None and b.per_class_accuracy is not None:
            lines += ["", *self._per_class()]
        return "\n".join(lines) + "\n"

    def _per_class(self) -> list[str]:
        a, b = self.models
        assert a.per_class_accuracy is not None and b.per_class_accuracy is not None
        if self.num_classes > 20:
            return ["Per-class accuracy: see the JSON report."]
        names = self.data.get("class_names") or [str(c) for c in range(self.num_classes)]
        return md_table(["class", a.name, b.name],
                        [[str(names[c]) if c < len(names) else str(c), fmt_pct(a.per_class_accuracy[c]),
                          fmt_pct(b.per_class_accuracy[c])] for c in range(self.num_classes)])


def _latency_cell(m: ModelReport, key: str) -> str:
    return fmt_ms(m.latency_ms[key] if m.latency_ms else None)


def _latency_lines(lat: dict[str, Any], name_a: str, name_b: str) -> list[str]:
    """The ratio lines under the table: the paired ratio and the ratio of the table's p50s side by side, from
    the same rounds, and a note when the second lies outside the first's interval."""
    lo, hi = lat["ratio_ci95"]
    lines = [f"Latency {md_escape(name_b)} / {md_escape(name_a)}, paired (median of paired ratios): "
             f"{fmt_ratio(lat['ratio'])} (95 % bootstrap interval {lo:.3f}-{hi:.3f}x); ratio of the p50s in the "
             f"table: {fmt_ratio(lat['ratio_of_medians'])}. Both come from the same {lat['rounds']} interleaved "
             f"rounds at batch {lat['batch']} (A and B back to back, ABBA order): the table gives each model's "
             f"own times over those rounds, the paired ratio compares the two calls of each round."]
    if not lat.get("ratio_of_medians_in_ci", True):
        lines.append("Note: the ratio of the p50s lies outside the paired interval. Most often the times switch "
                     "between fast and slow modes (a busy machine) and the two p50s fall in different latency "
                     "modes; the paired ratio, which compares calls made back to back, is the one to trust.")
    return lines


def write_json(result: CompareResult, path: str | Path) -> None:
    """Write the result as JSON, atomically."""
    write_text_atomic(path, strict_json(result.to_dict(), indent=2, default=str) + "\n")  # NaN/inf: null


def compare(runner_a: Runner, runner_b: Runner, source: ImageSource, *, batch: int = 32,
            latency_iters: int = 50, latency_batch: int = 1, latency_warmup: int = 5, labels: bool = True,
            progress: Progress | None = None, names: tuple[str, str] = ("A", "B")) -> CompareResult:
    """Compare two runners on every image of `source`.

    Before any inference, both models' inputs (non-batch dimensions, where static), class counts and the
    data's image shape must agree, else InputError. Runners not yet active are activated here and
    deactivated at the end. Accuracy metrics use the labels when `labels` is set and the source has them.

    Latency: bench.time_interleaved, `latency_iters` ABBA rounds on one fixed batch of the first
    `latency_batch` images after `latency_warmup` calls each (0 rounds: skipped). Each model's summary
    (p50, p90, ...) and the ratio come from the same rounds: metrics.paired_ratio, the median over rounds of
    B/A with a reproducible 95 % bootstrap interval, and beside it the ratio of the two p50s, flagged where
    it falls outside that interval (the p50s then sit in different latency modes of a busy machine)."""
    _check_request(source, batch, latency_iters, latency_batch, latency_warmup, names)
    runners = (runner_a, runner_b)
    with contextlib.ExitStack() as stack:
        for r in runners:
            if not r.active:
                r.activate()
                stack.callback(r.deactivate)
        input_shape, statics, num_classes = _check_models(runners, names, latency_batch if latency_iters else None)
        passes = _AccuracyPass(names, num_classes, labels and source.has_labels)
        fixed, data_shape = _run_accuracy(runners, statics, source, batch, input_shape, passes, latency_batch,
                                          progress)
        reports = passes.reports([r.info() for r in runners])
        latency = None
        if latency_iters:
            if len(fixed) < latency_batch:
                raise InputError(f"only {len(fixed)} readable images for a latency batch of {latency_batch}: "
                                 f"pass a smaller latency batch")
            report = None if progress is None else lambda done, total: progress("latency", done, total)
            times = time_interleaved(runners, fixed, latency_iters, latency_warmup, report)
            for rep, t in zip(reports, times, strict=True):
                rep.latency_ms = metrics.latency_summary(t, (50, 90))
            latency = _ratio(times, latency_batch, latency_warmup)
    return CompareResult(models=reports, agreement=passes.agreement, images=passes.n,
                         num_classes=passes.num_classes or 0, input_shape=list(data_shape),
                         has_labels=passes.use_labels, data=source.describe(), latency=latency)


def _check_request(source: ImageSource, batch: int, latency_iters: int, latency_batch: int, latency_warmup: int,
                   names: tuple[str, str]) -> None:
    flag_number(batch, "--batch", low=1)
    flag_number(latency_batch, "--latency-batch", low=1)
    if latency_iters < 0 or latency_warmup < 0:
        raise InputError(f"latency iterations must be non-negative, got {latency_iters} (warm-up {latency_warmup})")
    if len(names) != 2:
        raise InputError(f"give the two models two names, got {names}")
    if len(source) == 0:
        raise InputError(f"no images to compare on in {source.spec}")
    if latency_iters and len(source) < latency_batch:
        raise InputError(f"the latency batch of {latency_batch} needs at least as many images; {source.spec} "
                         f"has {len(source)}: pass a smaller latency batch")


def _run_accuracy(runners: tuple[Runner, Runner], statics: tuple[int | None, int | None], source: ImageSource,
                  batch: int, input_shape: tuple[int | str | None, ...], passes: _AccuracyPass, latency_batch: int,
                  progress: Progress | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """Feed every batch to A then B into `passes`; the first `latency_batch` images (fewer if the source has
    fewer readable ones) and the data's image shape."""
    it = iter(source.batches(batch))
    first = next(it, None)
    if first is None:
        raise InputError(f"no readable images to compare on in {source.spec}")
    data_shape = tuple(first.images.shape[1:])
    if any(isinstance(d, int) and d != x for d, x in zip(input_shape, data_shape, strict=True)):
        raise InputError(f"the data's images are {fmt_shape(('batch', *data_shape))} but the models expect "
                         f"{fmt_shape(('batch', *input_shape))}: set the preprocessing (resize/crop) to match")
    lat_images: list[np.ndarray] = []
    have = 0
    for b in itertools.chain([first], it):
        passes.add(b, [_infer(r, b.images, s, n) for r, s, n in zip(runners, statics, passes.names, strict=True)])
        if have < latency_batch:
            lat_images.append(b.images[: latency_batch - have])
            have += len(lat_images[-1])
        if progress is not None:
            progress("accuracy", passes.n, len(source))
    return np.ascontiguousarray(np.concatenate(lat_images)), data_shape


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
            pred, conf, ent = (np.concatenate(kept[k]) for kept in (self.pred, self.conf, self.ent))
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
        raise InputError(f"{name} takes input {ins[0].name!r} of shape {fmt_shape(ins[0].shape)}: compare needs "
                         f"images (batch, channels, height, width)")
    return ins[0], outs[0]


def _check_models(runners: tuple[Runner, Runner], names: tuple[str, str], latency_batch: int | None
                  ) -> tuple[tuple[int | str | None, ...], tuple[int | None, int | None], int | None]:
    """The non-batch input dimensions (static where either model fixes them), each model's fixed batch size
    (None where dynamic) and the number of classes where known; InputError on a mismatch."""
    (in_a, out_a), (in_b, out_b) = (_io(r, n) for r, n in zip(runners, names, strict=True))
    dims = []
    for da, db in zip(in_a.shape[1:], in_b.shape[1:], strict=True):
        if isinstance(da, int) and isinstance(db, int) and da != db:
            raise InputError(f"the models take different inputs: {names[0]} {fmt_shape(in_a.shape)}, {names[1]} "
                             f"{fmt_shape(in_b.shape)}")
        dims.append(da if isinstance(da, int) else db)
    ca, cb = _dim(out_a, -1), _dim(out_b, -1)
    if ca is not None and cb is not None and ca != cb:
        raise InputError(f"the models have different outputs: {names[0]} {fmt_shape(out_a.shape)}, {names[1]} "
                         f"{fmt_shape(out_b.shape)} ({ca} vs {cb} classes)")
    statics = (_dim(in_a, 0), _dim(in_b, 0))
    for s, n in zip(statics, names, strict=True):
        if latency_batch is not None and s is not None and s != latency_batch:
            raise InputError(f"{n} has a fixed batch size of {s}: pass a latency batch of {s}")
    return tuple(dims), statics, ca or cb


def _dim(info: TensorInfo, index: int) -> int | None:
    size = info.shape[index] if info.shape else None
    return size if isinstance(size, int) else None


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


def _ratio(times: np.ndarray, batch: int, warmup: int) -> dict[str, Any]:
    ratio = metrics.paired_ratio(times[0], times[1], resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
    return {"batch": batch, "rounds": times.shape[1], "warmup": warmup, "order": "ABBA", **ratio,
            "ratio_method": f"median over rounds of B/A (each round times A and B back to back, ABBA order); "
                            f"95 % percentile bootstrap over rounds, {BOOTSTRAP_RESAMPLES} resamples, seed "
                            f"{BOOTSTRAP_SEED}"}


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]
