"""Classification metrics on logits: softmax, entropy, confidence, accuracy, agreement, calibration error and
the prediction-histogram statistics the device loop uses as collapse gates. Pure numpy, no I/O.

Conventions: logits are (N, C) finite floats (NaN or Inf raise InputError, since a model that emits them
is broken and every statistic over it would be silently wrong); labels are (N,) integers in [0, C);
entropies are in nats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np

from gprebn_edge.errors import InputError

__all__ = [
    "DEFAULT_BINS", "Reliability", "check_logits", "softmax", "log_softmax", "predictions", "entropy",
    "confidence", "accuracy", "per_class_accuracy",
    "per_class_accuracy_from_predictions", "agreement", "reliability", "reliability_from_confidence",
    "expected_calibration_error",
    "class_histogram", "histogram_entropy", "predicted_class_entropy", "distinct_classes",
    "LATENCY_QUANTILES", "latency_summary", "paired_ratio",
]

DEFAULT_BINS = 15  # the usual choice for ECE (Guo et al. 2017)
LATENCY_QUANTILES = (50, 90, 99)


def check_logits(logits: np.ndarray, what: str = "logits") -> np.ndarray:
    """`logits` as a float (N, C) array with N, C >= 1 and every value finite; else a one-line InputError."""
    arr = np.asarray(logits)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"{what} must be a non-empty (samples, classes) array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise InputError(f"{what} must be numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.result_type(arr.dtype, np.float32), copy=False)  # float16 -> float32, ints -> float64
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = int((~finite).sum())
        raise InputError(f"{what} contain NaN or Inf in {bad} of {arr.shape[0]} samples: the model's output "
                         f"is not finite (check the input scaling, or the model/engine itself)")
    return arr


def _check_labels(labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise InputError(f"labels must be a ({n},) array to match the logits, got shape {lab.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        raise InputError(f"labels must be integers, got dtype {lab.dtype}")
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise InputError(f"labels must lie in [0, {num_classes}) for a {num_classes}-class model, got values "
                         f"in [{lab.min()}, {lab.max()}]: do the data's classes match the model's outputs?")
    return lab.astype(np.int64, copy=False)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = check_logits(logits)
    z = z - z.max(axis=1, keepdims=True)  # largest logit becomes 0: exp cannot overflow
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for any finite logits."""
    return np.exp(log_softmax(logits))


def predictions(logits: np.ndarray) -> np.ndarray:
    """Top-1 class per sample (the first one on ties, as np.argmax)."""
    return check_logits(logits).argmax(axis=1)


def entropy(logits: np.ndarray) -> np.ndarray:
    """Softmax entropy per sample, in nats: 0 for a one-hot prediction, log(C) for uniform logits."""
    logp = log_softmax(logits)
    return -(np.exp(logp) * logp).sum(axis=1)


def confidence(logits: np.ndarray) -> np.ndarray:
    """Maximum softmax probability per sample."""
    return np.exp(log_softmax(logits).max(axis=1))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose top-1 class is the label."""
    pred = predictions(logits)
    lab = _check_labels(labels, len(pred), np.shape(logits)[1])
    return float((pred == lab).mean())


def per_class_accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Accuracy over the samples of each class, shape (C,); NaN for a class with no samples (so the array
    always lines up with the model's classes; callers drop or report the NaNs)."""
    return per_class_accuracy_from_predictions(predictions(logits), labels, np.shape(logits)[1])


def per_class_accuracy_from_predictions(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """`per_class_accuracy` from top-1 predictions, for callers that keep only those."""
    pred = np.asarray(pred)
    lab = _check_labels(labels, len(pred), num_classes)
    total = np.bincount(lab, minlength=num_classes)
    right = np.bincount(lab, weights=(pred == lab).astype(np.float64), minlength=num_classes)
    return np.where(total > 0, right / np.maximum(total, 1), np.nan)


def agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Fraction of samples on which two models predict the same top-1 class."""
    a, b = check_logits(logits_a, "logits of A"), check_logits(logits_b, "logits of B")
    if a.shape != b.shape:
        raise InputError(f"cannot compare predictions of shapes {a.shape} and {b.shape}: same samples and "
                         f"classes needed")
    return float((a.argmax(axis=1) == b.argmax(axis=1)).mean())


@dataclass(frozen=True)
class Reliability:
    """Reliability-diagram data over equal-width confidence bins (lo, hi]: per bin the mean confidence,
    the accuracy (NaN where the bin is empty) and the number of samples."""

    edges: np.ndarray       # (bins + 1,), 0 .. 1
    confidence: np.ndarray  # (bins,)
    accuracy: np.ndarray    # (bins,)
    count: np.ndarray       # (bins,) int

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of |accuracy - confidence| * count / N."""
        n = int(self.count.sum())
        full = self.count > 0
        gap = np.abs(self.accuracy[full] - self.confidence[full])
        return float((gap * self.count[full]).sum() / n) if n else float("nan")


def reliability_from_confidence(conf: np.ndarray, correct: np.ndarray, bins: int = DEFAULT_BINS) -> Reliability:
    """Reliability bins from per-sample confidence in [0, 1] and correctness (bool); what `reliability`
    computes from logits, for callers that keep only these two arrays."""
    if bins < 1:
        raise InputError(f"the number of calibration bins must be at least 1, got {bins}")
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if conf.ndim != 1 or conf.shape != correct.shape:
        raise InputError(f"confidence and correctness must be (N,) arrays of one length, got shapes "
                         f"{conf.shape} and {correct.shape}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin i holds edges[i] < conf <= edges[i+1]; confidence 0 (impossible for a softmax) goes to bin 0
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(idx, minlength=bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=bins)
    mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
    mean_acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
    return Reliability(edges=edges, confidence=mean_conf, accuracy=mean_acc, count=count)


def reliability(logits: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> Reliability:
    """Reliability-diagram data of the top-1 predictions over `bins` equal-width confidence bins."""
    pred = predictions(logits)
    lab = _check_labels(labels, len(pred), np.shape(logits)[1])
    return reliability_from_confidence(confidence(logits), pred == lab, bins)


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """Standard top-1 ECE over `bins` equal-width confidence bins: sum |acc - conf| * n_bin / N."""
    return reliability(logits, labels, bins).ece


def class_histogram(logits: np.ndarray) -> np.ndarray:
    """How many samples are predicted as each class, shape (C,)."""
    return np.bincount(predictions(logits), minlength=np.shape(logits)[1])


def histogram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats) of the distribution a count histogram describes: 0 when every sample is in one
    class, log(C) when the C classes are equally frequent."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise InputError(f"a class histogram needs non-negative counts with a positive total, got {counts}")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def predicted_class_entropy(logits: np.ndarray) -> float:
    """Entropy (nats) of the predicted-class histogram: near 0 when the predictions collapse to one class."""
    return histogram_entropy(class_histogram(logits))


def distinct_classes(logits: np.ndarray) -> int:
    """Number of different top-1 classes predicted."""
    return int((class_histogram(logits) > 0).sum())


@overload
def latency_summary(ms: Sequence[float] | np.ndarray, quantiles: Sequence[float] = ...,
                    *, allow_empty: Literal[False] = ...) -> dict[str, float]: ...
@overload
def latency_summary(ms: Sequence[float] | np.ndarray, quantiles: Sequence[float] = ...,
                    *, allow_empty: bool) -> dict[str, float] | None: ...


def latency_summary(ms: Sequence[float] | np.ndarray, quantiles: Sequence[float] = LATENCY_QUANTILES,
                    *, allow_empty: bool = False) -> dict[str, float] | None:
    """The one latency summary of the package: "p50", "p90", ... for each quantile (in percent, linear
    interpolation as np.percentile; 99.9 gives "p99.9"), then mean, population std (bench's CV is std /
    mean), min, max and the count "n". Empty input is an InputError, or None with `allow_empty` (a log with
    no adapting frames); a NaN or infinite latency is always an InputError (a broken clock or log)."""
    a = np.asarray(ms, dtype=np.float64).ravel()
    if not all(0 <= q <= 100 for q in quantiles):
        raise InputError(f"latency quantiles are percentages in [0, 100], got {list(quantiles)}")
    if a.size == 0:
        if allow_empty:
            return None
        raise InputError("no latencies to summarize: time at least one call")
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise InputError(f"{bad} of {a.size} latencies are NaN or infinite: the timings are broken (a clock or a "
                         f"log that is not a latency)")
    out = {f"p{q:g}": float(v) for q, v in zip(quantiles, np.percentile(a, list(quantiles)), strict=True)}
    out.update(mean=float(a.mean()), std=float(a.std()), min=float(a.min()), max=float(a.max()), n=int(a.size))
    return out


def paired_ratio(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, resamples: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """B / A from paired timings (a[i], b[i] measured back to back): "ratio", the median over pairs of
    b/a, which cancels drift and the slow modes of a busy machine; "ratio_ci95", its 95 % percentile bootstrap
    interval over pairs (`resamples`, fixed `seed`: reproducible); "ratio_cv", the std / mean of the paired
    ratios; "ratio_of_medians", median(b) / median(a), what two p50s side by side suggest, and
    "ratio_of_medians_in_ci", whether it lies in that interval (at 3 decimals, as printed): when it does not,
    the two medians fell in different latency modes and contradict the paired ratio."""
    for x in (a, b):
        latency_summary(x, (50,))  # empty or non-finite: InputError
    ta, tb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if ta.shape != tb.shape or (ta <= 0).any() or (tb <= 0).any():
        raise InputError(f"paired timings need two equally long lists of positive times, got {ta.size} and "
                         f"{tb.size}")
    paired = tb / ta
    idx = np.random.default_rng(seed).integers(0, len(paired), size=(resamples, len(paired)))
    lo, hi = np.percentile(np.median(paired[idx], axis=1), [2.5, 97.5])
    of_medians = float(np.median(tb) / np.median(ta))
    return {"ratio": float(np.median(paired)), "ratio_ci95": [float(lo), float(hi)],
            "ratio_cv": float(paired.std() / paired.mean()), "ratio_of_medians": of_medians,
            "ratio_of_medians_in_ci": bool(round(lo, 3) <= round(of_medians, 3) <= round(hi, 3))}
