"""Health of an adapted model: is it likely worse than the model it replaces? One module for `adapt`'s check
and for the device loop's gates (device/gates.py), so both use one set of signals and thresholds.

Every signal looks at logits of the same images through the unadapted and the adapted model (for `adapt`:
a held-back slice of the calibration images that adaptation never saw). Without labels, the signals are:

- **absolute** (the adapted model alone, whatever the unadapted one did): one class for most of the images
  while being near-certain (`collapsed`, the loop's definition too); near-certain on everything where the
  unadapted model was not; one class dominating where the unadapted model spread its predictions;
- **relative** (against the unadapted model, which counts as a reference only while it is not
  degenerate: under a strong shift it can itself predict few classes, and a collapse onto two classes is
  then no relative fall): near-certain and disagreeing with it (Cohen's kappa, agreement above chance);
  prediction diversity halved;
- mean entropy near uniform after adaptation (higher than before): the new statistics do not describe the
  site. A plain rise in entropy is not a signal: under a strong shift the unadapted model is confidently
  wrong, and a helpful adaptation raises its entropy.

With labels (class folders, npz labels, built-in data), held-back accuracy before and after decides too: a
drop of more than `max_accuracy_drop` is `suspect`, a drop of more than `collapse_accuracy_drop`, or a
drop to near chance, is `collapsed`. A labeled gain overrides the unsupervised `collapsed` signals but one:
a model that answers one class with certainty is refused whatever a few labels say.

Thresholds are fractions of ln(classes), so one setting fits 10 and 1000 classes; benchmarks/health.py
measures their catches and false alarms. numpy only: the loop serves without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gprebn_edge.runtime import metrics

__all__ = ["Thresholds", "Summary", "summarize", "kappa", "assess", "advice", "holdout_size", "unchecked",
           "OK", "SUSPECT", "COLLAPSED", "NON_FINITE", "UNCHECKED"]

OK, SUSPECT, COLLAPSED, NON_FINITE, UNCHECKED = "ok", "suspect", "collapsed", "non-finite", "unchecked"
_RANK = {OK: 0, SUSPECT: 1, COLLAPSED: 2}
_EPS = 1e-9  # comparisons at exactly a threshold pass, whatever the float rounding


@dataclass(frozen=True)
class Thresholds:
    """When a signal fires. Entropies are fractions of ln(classes)."""

    # absolute: shared with the loop's gates
    min_mean_entropy: float = 0.02     # below: near-certain on everything (healthy adaptations: >= 0.07)
    degenerate_top_share: float = 0.9  # one class for >= 90 % of the images
    # relative to a non-degenerate unadapted model
    uncertain: float = 0.7             # mean entropy after >= 0.7, and higher than before: near-uniform
    diversity_drop: float = 0.5        # class-histogram entropy after < 0.5 x before
    confident: float = 0.1             # mean entropy after < 0.1 together with a diversity drop or a low kappa
    min_kappa: float = 0.2             # agreement above chance with the unadapted model, when near-certain
    # labels (held-back accuracy, fractions)
    max_accuracy_drop: float = 0.02    # more: suspect
    collapse_accuracy_drop: float = 0.10  # more: collapsed
    near_chance: float = 1.5           # accuracy <= 1.5 / classes after a drop: collapsed
    min_label_images: int = 2          # a drop of fewer images than this is one image's noise, not a signal
    min_images: int = 40               # fewer calibration images: no check (and a warning)


@dataclass(frozen=True)
class Summary:
    """What one model says about a set of images: mean entropy and predicted-class-histogram entropy as
    fractions of ln(classes), the most frequent class's share, the number of distinct classes; input_shift
    as the loop's worker measured it (serving model only)."""

    mean_entropy: float
    class_entropy: float
    top_share: float
    distinct: int
    input_shift: float | None = None

    def collapsed(self, t: Thresholds) -> bool:
        """One class dominating and near-certain: no set of labels can vouch for this model."""
        return self.top_share >= t.degenerate_top_share - _EPS and self.mean_entropy < t.min_mean_entropy - _EPS

    def degenerate(self, t: Thresholds, max_input_shift: float | None = None) -> str | None:
        """Why this model's outputs are no evidence about another model's, or None: one class dominating,
        entropy near zero, or (with max_input_shift) inputs far from its BN statistics."""
        if self.top_share >= t.degenerate_top_share - _EPS:
            return (f"one class for {100 * self.top_share:.0f} % of the slice (>= "
                    f"{100 * t.degenerate_top_share:.0f} %), mean entropy {self.mean_entropy:.4f} of log(C)")
        if self.mean_entropy < t.min_mean_entropy - _EPS:
            return f"mean entropy {self.mean_entropy:.4f} < floor {t.min_mean_entropy} of log(C)"
        if max_input_shift is not None and self.input_shift is not None and \
                self.input_shift >= max_input_shift - _EPS:
            return f"input statistics {self.input_shift:.2f} sigma from its BN statistics (>= {max_input_shift})"
        return None


def summarize(logits: np.ndarray, input_shift: float | None = None) -> Summary:
    """The Summary of finite (n, C) logits."""
    log_c = math.log(np.shape(logits)[1])
    hist = metrics.class_histogram(logits)
    return Summary(mean_entropy=float(metrics.entropy(logits).mean()) / log_c,
                   class_entropy=metrics.histogram_entropy(hist) / log_c,
                   top_share=float(hist.max() / hist.sum()), distinct=int((hist > 0).sum()),
                   input_shift=input_shift)


def kappa(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(top-1 agreement, chance agreement, Cohen's kappa) of two models' logits on the same images; kappa is
    0 when chance is 1 (both predict one and the same class: the diversity signals judge that)."""
    agree = metrics.agreement(a, b)
    pa = metrics.class_histogram(a) / len(a)
    pb = metrics.class_histogram(b) / len(b)
    chance = float((pa * pb).sum())
    return agree, chance, (agree - chance) / (1.0 - chance) if chance < 1.0 - _EPS else 0.0


def holdout_size(n: int, fraction: float, cap: int = 500, floor: int = 16,
                 thresholds: Thresholds = Thresholds()) -> int:
    """Images to hold back from `n` calibration images: `fraction` of them, at least `floor`, at most `cap`;
    0 when there are too few images to spare any (then no health check runs)."""
    if fraction <= 0 or n < thresholds.min_images:
        return 0
    return int(min(cap, max(floor, round(fraction * n)), n // 2))


def unchecked(reason: str) -> dict[str, Any]:
    """The health record of an adaptation that was not checked, and why."""
    return {"verdict": UNCHECKED, "unsupervised_verdict": UNCHECKED, "signals": [], "images": 0, "reason": reason}


def _profile(logits: np.ndarray) -> dict[str, Any]:
    """The record's view of one model, in nats (as `info` and `compare` print it)."""
    if not np.isfinite(logits).all():
        return {"finite": False, "entropy": None, "confidence": None, "classes_predicted": None,
                "histogram_entropy": None}
    hist = metrics.class_histogram(logits)
    return {"finite": True, "entropy": float(metrics.entropy(logits).mean()),
            "confidence": float(metrics.softmax(logits).max(axis=1).mean()),
            "classes_predicted": int((hist > 0).sum()),
            "histogram_entropy": metrics.histogram_entropy(hist) + 0.0}  # + 0.0: one class gives 0.0, not -0.0


def _unsupervised(before: np.ndarray, after: np.ndarray, t: Thresholds) -> list[tuple[str, str, bool]]:
    """(verdict, signal, vouchable) triples; vouchable: a labeled gain may lower it to suspect."""
    k = after.shape[1]
    b, a = summarize(before), summarize(after)
    signals: list[tuple[str, str, bool]] = []
    if a.collapsed(t):
        signals.append((COLLAPSED, f"the adapted model collapsed: one class for {a.top_share:.0%} of the images at "
                        f"mean entropy {a.mean_entropy:.3f} of ln {k}", False))
    elif a.mean_entropy < t.min_mean_entropy - _EPS and b.mean_entropy >= t.min_mean_entropy - _EPS:
        signals.append((COLLAPSED, f"the adapted model is near-certain on every image (mean entropy "
                        f"{a.mean_entropy:.3f} of ln {k}, the unadapted model's {b.mean_entropy:.3f})", True))
    elif a.top_share >= t.degenerate_top_share - _EPS and b.top_share < t.degenerate_top_share - _EPS:
        signals.append((SUSPECT, f"one class for {a.top_share:.0%} of the images (the unadapted model's top class: "
                        f"{b.top_share:.0%})", True))
    if a.mean_entropy >= t.uncertain - _EPS and a.mean_entropy > b.mean_entropy:
        signals.append((SUSPECT, f"mean entropy rose from {b.mean_entropy * math.log(k):.2f} to "
                        f"{a.mean_entropy * math.log(k):.2f} nats under adaptation, close to uniform "
                        f"({a.mean_entropy:.0%} of ln {k})", True))
    if b.degenerate(t) is not None:  # the unadapted model is no reference
        return signals
    if a.class_entropy < t.diversity_drop * b.class_entropy - _EPS:
        verdict = COLLAPSED if a.mean_entropy < t.confident - _EPS else SUSPECT
        signals.append((verdict, f"prediction diversity collapsed: {b.distinct} -> {a.distinct} classes predicted, "
                        f"class-histogram entropy {b.class_entropy * math.log(k):.2f} -> "
                        f"{a.class_entropy * math.log(k):.2f}", True))
    agree, chance, kap = kappa(before, after)
    if a.mean_entropy < t.confident - _EPS and kap < t.min_kappa - _EPS:
        signals.append((COLLAPSED, f"confidently different: mean entropy {a.mean_entropy:.3f} of ln {k}, and "
                        f"agreement with the unadapted model {agree:.0%} at chance {chance:.0%} (kappa {kap:.2f} < "
                        f"{t.min_kappa})", True))
    return signals


def _labeled(before: np.ndarray, after: np.ndarray, labels: np.ndarray, t: Thresholds
             ) -> tuple[dict[str, Any], list[tuple[str, str, bool]]]:
    n, k = after.shape
    right_before = before.argmax(1) == labels
    right_after = after.argmax(1) == labels
    acc_b, acc_a = float(right_before.mean()), float(right_after.mean())
    record = {"images": n, "accuracy_before": acc_b, "accuracy_after": acc_a}
    lost = int(right_before.sum() - right_after.sum())
    drop = acc_b - acc_a
    if lost < t.min_label_images or drop <= t.max_accuracy_drop + _EPS:
        return record, []
    text = f"held-back accuracy fell from {acc_b:.1%} to {acc_a:.1%} on {n} labeled images"
    if drop > t.collapse_accuracy_drop + _EPS or acc_a <= t.near_chance / k + _EPS:
        chance = f", near chance ({1 / k:.0%})" if acc_a <= t.near_chance / k + _EPS else ""
        return record, [(COLLAPSED, text + chance, False)]
    return record, [(SUSPECT, text, False)]


def _worst(signals: list[tuple[str, str, bool]]) -> str:
    return max((v for v, _, _ in signals), key=_RANK.__getitem__, default=OK)


def assess(before: np.ndarray, after: np.ndarray, labels: np.ndarray | None = None,
           thresholds: Thresholds = Thresholds()) -> dict[str, Any]:
    """The health record stored in the artifact: both models' profiles, agreement, labeled accuracy (with
    labels), the signals that fired, the verdict and the verdict the labels were not asked for."""
    t = thresholds
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    n, k = after.shape
    record: dict[str, Any] = {
        "images": n, "classes": k, "before": _profile(before), "after": _profile(after), "agreement": None,
        "kappa": None, "labeled": None, "signals": [], "verdict": OK, "unsupervised_verdict": OK,
        "thresholds": {"uncertain_nats": t.uncertain * math.log(k), "diversity_drop": t.diversity_drop,
                       "min_mean_entropy_nats": t.min_mean_entropy * math.log(k), "min_kappa": t.min_kappa,
                       "max_accuracy_drop": t.max_accuracy_drop,
                       "collapse_accuracy_drop": t.collapse_accuracy_drop}}
    if not np.isfinite(after).all():
        record.update(signals=["the adapted model's outputs are not finite (NaN or Inf)"], verdict=NON_FINITE,
                      unsupervised_verdict=NON_FINITE)
        return record
    if not np.isfinite(before).all():  # nothing to compare with; the adapted model at least gives numbers
        return record
    record["agreement"], _, record["kappa"] = kappa(before, after)
    signals = _unsupervised(before, after, t)
    record["unsupervised_verdict"] = _worst(signals)
    if labels is not None and len(labels) == n and np.all((labels >= 0) & (labels < k)):
        record["labeled"], from_labels = _labeled(before, after, np.asarray(labels), t)
        if record["labeled"]["accuracy_after"] >= record["labeled"]["accuracy_before"] - _EPS:
            signals = [(SUSPECT if v == COLLAPSED and vouchable else v, s, vouchable) for v, s, vouchable in signals]
        signals += from_labels
    record["signals"] = [s for _, s, _ in signals]
    record["verdict"] = _worst(signals)
    return record


def advice(record: dict[str, Any]) -> str:
    """One sentence: what the signals say and what to try."""
    what = "; ".join(record["signals"])
    if record["verdict"] == NON_FINITE:
        return f"{what}: lower --lr, or check the calibration images and --mean/--std"
    if record["verdict"] == COLLAPSED:
        return f"{what}: the adapted model collapsed; lower --lr, or use --method adabn"
    return (f"the adapted model is likely worse on held-back calibration images ({what}); try --theta 0.2-0.5 "
            "(keep more of the source statistics), more images, or more varied images (several scenes and "
            "classes)")
