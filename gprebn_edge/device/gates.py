"""The gates a re-adapted candidate must pass before the device loop serves it, and the SAR-style policy
that resets adaptation after repeated failures. Pure numpy, no I/O.

Every check runs on logits of the same held-back slice of the loop's buffer (candidate and current model),
plus, optionally, a small labeled probe set:

- finite:           every candidate logit is finite (slice and probe).
- mean_entropy:     mean softmax entropy / log(C) >= min_mean_entropy. An absolute floor: entropy
                    minimization that collapses drives it to ~0.
- class_entropy:    entropy of the predicted-class histogram >= min_class_entropy x the reference model's
                    on the same slice. Relative, because the slice itself may be imbalanced (a camera that
                    sees mostly one class): the current model then has a low value too, and so may the candidate.
- distinct_classes: distinct predicted classes >= ceil(min_distinct_classes x the reference model's).
- agreement:        top-1 agreement with the current model >= min_agreement, OR its chance-corrected value
                    (Cohen's kappa) >= min_kappa. See GateConfig for why both.
- probe_accuracy:   with a labeled probe set, candidate accuracy >= current accuracy - max_accuracy_drop.

The reference for the two diversity checks is the current model unless the caller passes another (the
source model or the last known-good one), which stops a slow ratchet where each swap may halve diversity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gprebn_edge.errors import InputError
from gprebn_edge.runtime import metrics

__all__ = ["GateConfig", "Check", "GateResult", "Probe", "evaluate_gates", "RecoveryPolicy", "GATE_NAMES"]

GATE_NAMES = ("finite", "mean_entropy", "class_entropy", "distinct_classes", "agreement", "probe_accuracy")

# (candidate probe logits, current probe logits, labels)
Probe = tuple[np.ndarray, np.ndarray, np.ndarray]

_EPS = 1e-9  # comparisons at exactly the threshold pass, whatever the float rounding


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the gates. Defaults were chosen on the built-in model and data (small ResNet, 10 digit
    classes, CIFAR-10-C-style corruptions at severity 5; source model vs a GpreBN-adapted one on 1000 test
    images per corruption):

    - min_mean_entropy 0.02 (fraction of log C): healthy models measured 0.12-0.62 before and after
      adaptation; a collapsed one is ~0.
    - min_class_entropy 0.5 and min_distinct_classes 0.5 (fractions of the reference model's value): adapted
      models measured 0.95-1.0 of log C even where the source model was down to 0.32 (impulse noise).
    - min_agreement 0.5 with min_kappa 0.05: where the current model is poor, a good candidate MUST disagree
      with it (impulse noise: 18.7 % -> 79.8 % accuracy at 0.20 agreement, chance 0.11, kappa 0.11;
      gaussian noise 0.27 / kappa 0.17), so raw agreement alone would reject the most useful swaps. Kappa
      alone misfires on imbalanced slices (two models that both say "class 3" 95 % of the time and agree on
      93 % have kappa ~0.1), so the check passes when either holds. An unrelated candidate (random or
      permuted outputs) sits at kappa ~0 (+-0.02 on 256 frames).
    - max_accuracy_drop 0.02 on the probe set; require_finite True (False drops non-finite rows from the
      statistics and counts them as wrong on the probe; a candidate with no finite row still fails).
    """

    min_mean_entropy: float = 0.02
    min_class_entropy: float = 0.5
    min_distinct_classes: float = 0.5
    min_agreement: float = 0.5
    min_kappa: float = 0.05
    max_accuracy_drop: float = 0.02
    require_finite: bool = True

    def __post_init__(self) -> None:
        for name in ("min_mean_entropy", "min_class_entropy", "min_distinct_classes", "min_agreement",
                     "max_accuracy_drop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"gate threshold {name} must lie in [0, 1], got {value}")
        if not -1.0 <= self.min_kappa <= 1.0:
            raise InputError(f"gate threshold min_kappa must lie in [-1, 1], got {self.min_kappa}")


@dataclass(frozen=True)
class Check:
    """One gate's outcome. skipped: not evaluated (passed is then False but it is not a reason)."""

    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str = ""
    skipped: bool = False


@dataclass(frozen=True)
class GateResult:
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed or c.skipped for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        """One line per failed check, for the loop's log."""
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.passed and not c.skipped]

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": self.reasons, "checks": [asdict(c) for c in self.checks]}


def _as_logits(x: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 2:
        raise InputError(f"{what} must be a (samples, classes) array with at least 1 sample and 2 classes, "
                         f"got shape {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise InputError(f"{what} must be numbers, got dtype {arr.dtype}")
    return arr.astype(np.result_type(arr.dtype, np.float32), copy=False)


def _skip(name: str, why: str) -> Check:
    return Check(name, False, None, None, f"skipped: {why}", skipped=True)


def _kappa(a: np.ndarray, b: np.ndarray, agree: float) -> tuple[float, float]:
    """Chance agreement of two predicted-class histograms and Cohen's kappa (0 when chance is 1: both
    models predict one and the same class, which the diversity checks judge)."""
    pa = metrics.class_histogram(a) / len(a)
    pb = metrics.class_histogram(b) / len(b)
    chance = float((pa * pb).sum())
    return chance, (agree - chance) / (1.0 - chance) if chance < 1.0 - _EPS else 0.0


def _check_probe(probe: Probe, classes: int) -> Probe:
    if len(probe) != 3:
        raise InputError(f"a probe is (candidate logits, current logits, labels), got {len(probe)} items")
    cand = _as_logits(probe[0], "candidate probe logits")
    cur = metrics.check_logits(probe[1], "current model's probe logits")
    if cand.shape != cur.shape or cand.shape[1] != classes:
        raise InputError(f"probe logits of the candidate {cand.shape} and the current model {cur.shape} must "
                         f"have one shape, with the slice's {classes} classes")
    return cand, cur, probe[2]


def _probe_check(probe: Probe, config: GateConfig) -> Check:
    cand, cur, labels = probe
    cur_acc = metrics.accuracy(cur, labels)  # also checks the labels
    finite = np.asarray(np.isfinite(cand).all(axis=1))
    pred = np.where(finite[:, None], cand, 0.0).argmax(axis=1)
    cand_acc = float(((pred == np.asarray(labels)) & finite).mean())  # a non-finite row counts as wrong
    change = cand_acc - cur_acc
    threshold = -config.max_accuracy_drop
    detail = (f"probe accuracy {cand_acc:.4f} vs current {cur_acc:.4f} ({change:+.4f}; allowed drop "
              f"{config.max_accuracy_drop}) on {len(finite)} images")
    return Check("probe_accuracy", change >= threshold - _EPS, change, threshold, detail)


def evaluate_gates(candidate_logits: np.ndarray, current_logits: np.ndarray, config: GateConfig | None = None,
                   probe: Probe | None = None, reference_logits: np.ndarray | None = None) -> GateResult:
    """Run every gate on logits of one held-back slice; see the module docstring. reference_logits (default:
    the current model's) are what the diversity checks are relative to. Non-finite candidate logits fail
    `finite` (the statistics are then skipped); non-finite current/reference logits, mismatched shapes or
    bad probe labels raise InputError, since those are the caller's to fix."""
    config = config or GateConfig()
    cand = _as_logits(candidate_logits, "candidate logits")
    cur = metrics.check_logits(current_logits, "current model's logits")
    if cand.shape != cur.shape:
        raise InputError(f"candidate logits {cand.shape} and current model's logits {cur.shape} must have one "
                         f"shape: the same held-back frames through both models")
    ref = cur if reference_logits is None else metrics.check_logits(reference_logits, "reference logits")
    if ref.shape != cand.shape:
        raise InputError(f"reference logits {ref.shape} and candidate logits {cand.shape} must have one shape: "
                         f"the same held-back frames through both models")
    n, classes = cand.shape
    log_c = math.log(classes)
    if probe is not None:
        probe = _check_probe(probe, classes)

    rows = np.isfinite(cand).all(axis=1)
    bad = int(n - rows.sum())
    probe_bad = 0 if probe is None else int((~np.isfinite(probe[0]).all(axis=1)).sum())
    finite_ok = (bad == 0 and probe_bad == 0) or (not config.require_finite and bad < n)
    detail = (f"{bad} of {n} slice rows" + (f" and {probe_bad} probe rows" if probe is not None else "")
              + " hold NaN or Inf" + ("" if config.require_finite else " (allowed: require_finite is off)"))
    checks = [Check("finite", finite_ok, float(bad + probe_bad), 0.0, detail)]

    if not finite_ok:
        why = "candidate logits are not finite"
        checks += [_skip(name, why) for name in GATE_NAMES[1:]]
        return GateResult(checks)
    if bad:
        cand, cur, ref = cand[rows], cur[rows], ref[rows]

    h = float(metrics.entropy(cand).mean()) / log_c
    checks.append(Check("mean_entropy", h >= config.min_mean_entropy - _EPS, h, config.min_mean_entropy,
                        f"mean entropy {h:.4f} of log(C) (floor {config.min_mean_entropy})"))

    hc = metrics.predicted_class_entropy(cand) / log_c
    hr = metrics.predicted_class_entropy(ref) / log_c
    t = config.min_class_entropy * hr
    checks.append(Check("class_entropy", hc >= t - _EPS, hc, t,
                        f"class-histogram entropy {hc:.4f} of log(C), reference {hr:.4f} "
                        f"(floor {config.min_class_entropy} x reference = {t:.4f})"))

    dc, dr = metrics.distinct_classes(cand), metrics.distinct_classes(ref)
    td = math.ceil(config.min_distinct_classes * dr - _EPS)
    checks.append(Check("distinct_classes", dc >= td, float(dc), float(td),
                        f"{dc} distinct predicted classes, reference {dr} (floor {config.min_distinct_classes} "
                        f"x reference, rounded up = {td})"))

    agree = metrics.agreement(cand, cur)
    chance, kappa = _kappa(cand, cur, agree)
    ok = agree >= config.min_agreement - _EPS or kappa >= config.min_kappa - _EPS
    checks.append(Check("agreement", ok, agree, config.min_agreement,
                        f"top-1 agreement {agree:.4f} with the current model (floor {config.min_agreement}), "
                        f"chance {chance:.4f}, kappa {kappa:.4f} (floor {config.min_kappa})"))

    if probe is None:
        checks.append(_skip("probe_accuracy", "no labeled probe set"))
    else:
        checks.append(_probe_check(probe, config))
    return GateResult(checks)


@dataclass
class RecoveryPolicy:
    """Counts consecutive gate failures; after max_failures in a row the loop should reset adaptation to
    the last good state (SAR's model recovery, Niu et al. 2023, triggered by failed gates instead of an
    entropy EMA)."""

    max_failures: int = 3
    consecutive_failures: int = 0

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise InputError(f"max_failures must be at least 1, got {self.max_failures}")

    def record(self, passed: bool) -> bool:
        """Count one gate outcome; returns should_reset()."""
        self.consecutive_failures = 0 if passed else self.consecutive_failures + 1
        return self.should_reset()

    def should_reset(self) -> bool:
        return self.consecutive_failures >= self.max_failures

    def reset(self) -> None:
        """Call after resetting adaptation."""
        self.consecutive_failures = 0
