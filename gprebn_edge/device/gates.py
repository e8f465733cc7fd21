"""The gates a re-adapted candidate must pass before the device loop serves it, and the SAR-style policy
that resets adaptation after repeated failures. Pure numpy, no I/O.

Every check runs on logits of the same held-back slice of the loop's buffer through three models: the
candidate, the serving model and (optionally) the unadapted source model; plus, optionally, a small
labeled probe set. The candidate is judged on its merits, not on how much it resembles what serves now:
after a shift on which the serving model is confidently wrong (one class, entropy ~0), a good candidate
MUST disagree with it, and gates that reward agreement with it would keep the loop stuck there forever.

With a labeled probe, the probe decides:

- finite:          every candidate logit is finite (slice and probe).
- probe_accuracy:  candidate accuracy >= serving accuracy - max_accuracy_drop.
- the unsupervised checks below are computed and reported but advisory, with one exception: a candidate
  whose slice outputs are collapsed (health.Summary.collapsed: mean entropy below min_mean_entropy AND
  top-class share >= degenerate_top_share) is rejected whatever the probe says. A few labeled images
  cannot vouch for a model that answers one class with certainty on everything it sees.

Without a probe, every model gets a health summary on the slice (health.summarize: mean entropy / log C,
predicted-class histogram entropy / log C, top-class share, distinct classes). A reference model (serving or source) is
**degenerate**, and so no evidence about the candidate, when one class dominates the slice (top-class share
>= degenerate_top_share), its mean entropy is under min_mean_entropy, or (serving model) the worker measured
the slice's input statistics >= max_input_shift sigmas from its BN statistics: it was adapted to a domain
the stream has left, and a candidate adapted to the new one must disagree with it. The source model is not
judged by its input statistics: it never saw the deployment's domain, yet unless it collapsed, agreeing
with it above chance is what keeps a broken candidate out (a learning rate x 1000). The references are the
non-degenerate ones. The same definitions decide `adapt`'s check (health.py).

- mean_entropy:     mean softmax entropy / log(C) >= min_mean_entropy, and >= min_entropy_ratio x the
                    highest reference's: entropy minimization that collapses drives it towards 0, and a model
                    far more certain than every reference on the same frames has collapsed on its way there.
- class_entropy:    entropy of the predicted-class histogram >= min_class_entropy x the best reference's.
                    Relative, because the slice itself may be imbalanced. With no reference, the candidate
                    must itself not be degenerate (one class dominating, or entropy under the floor).
- distinct_classes: distinct predicted classes >= ceil(min_distinct_classes x the best reference's), and at
                    least 2 where a reference has 2 or more; with no reference, as class_entropy.
- agreement:        Cohen's kappa (agreement above chance) >= min_kappa with ANY reference. Raw agreement is
                    reported but never enough: a collapsed candidate can agree with a model that predicts
                    two classes at chance level. Skipped (not a failure) when there is no reference.

A slice where one class really dominates (a camera that sees mostly one class) leaves no reference, so the
candidate must be diverse itself: such a loop rarely swaps, which is safe.

Taking the best of serving and source for the diversity floor stops a slow ratchet where each swap may
halve diversity; agreement with either keeps an unrelated (random, permuted) candidate out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gprebn_edge import health
from gprebn_edge.errors import InputError
from gprebn_edge.health import Summary, Thresholds
from gprebn_edge.io import finite_json
from gprebn_edge.runtime import metrics

__all__ = ["GateConfig", "Check", "GateResult", "Probe", "evaluate_gates", "serving_worse", "RecoveryPolicy",
           "GATE_NAMES"]

GATE_NAMES = ("finite", "mean_entropy", "class_entropy", "distinct_classes", "agreement", "probe_accuracy")

# (candidate probe logits, serving probe logits, labels)
Probe = tuple[np.ndarray, np.ndarray, np.ndarray]

_EPS = 1e-9  # comparisons at exactly the threshold pass, whatever the float rounding


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the gates, as fractions of log C where they are entropies. The floors that say when a
    model is degenerate or collapsed (min_mean_entropy, degenerate_top_share) and the labeled drop
    (max_accuracy_drop) are health.py's, shared with `adapt`'s check; where the defaults were measured:
    benchmarks/results/gate_thresholds.md. require_finite False drops non-finite rows from the statistics
    and counts them as wrong on the probe; a candidate with no finite row still fails."""

    min_mean_entropy: float = Thresholds.min_mean_entropy
    min_entropy_ratio: float = 0.2
    min_class_entropy: float = 0.8
    min_distinct_classes: float = 0.8
    min_kappa: float = 0.05
    max_accuracy_drop: float = Thresholds.max_accuracy_drop
    degenerate_top_share: float = Thresholds.degenerate_top_share
    max_input_shift: float = 0.1
    require_finite: bool = True

    def __post_init__(self) -> None:
        for name in ("min_mean_entropy", "min_entropy_ratio", "min_class_entropy", "min_distinct_classes",
                     "max_accuracy_drop", "degenerate_top_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"gate threshold {name} must lie in [0, 1], got {value}")
        if not -1.0 <= self.min_kappa <= 1.0:
            raise InputError(f"gate threshold min_kappa must lie in [-1, 1], got {self.min_kappa}")
        if not (math.isfinite(self.max_input_shift) and self.max_input_shift > 0):
            raise InputError(f"gate threshold max_input_shift must be a positive number of sigmas, got "
                             f"{self.max_input_shift}")

    @property
    def thresholds(self) -> Thresholds:
        """The health floors these gates judge degenerate and collapsed models by."""
        return Thresholds(min_mean_entropy=self.min_mean_entropy, degenerate_top_share=self.degenerate_top_share,
                          max_accuracy_drop=self.max_accuracy_drop)


@dataclass(frozen=True)
class Check:
    """One gate's outcome. skipped: not evaluated (passed is then False but it is not a reason).
    advisory: computed and reported, but a failure is not a reason (the probe decides)."""

    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str = ""
    skipped: bool = False
    advisory: bool = False


@dataclass(frozen=True)
class GateResult:
    """checks in GATE_NAMES order; references: the models the relative checks were judged against
    ("serving", "source"); degenerate: model -> why it was no evidence; health: model -> its summary."""

    checks: list[Check] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    degenerate: dict[str, str] = field(default_factory=dict)
    health: dict[str, Summary] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed or c.skipped or c.advisory for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        """One line per failed check, for the loop's log."""
        return [f"{c.name}: {c.detail}" for c in self.checks if not (c.passed or c.skipped or c.advisory)]

    @property
    def advisories(self) -> list[str]:
        """One line per failed advisory check: worth logging, not a reason."""
        return [f"{c.name}: {c.detail}" for c in self.checks if c.advisory and not (c.passed or c.skipped)]

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-safe (no NaN or Inf: None instead)."""
        return finite_json({"passed": self.passed, "reasons": self.reasons, "advisories": self.advisories,
                           "references": list(self.references), "degenerate": dict(self.degenerate),
                           "health": {k: asdict(h) for k, h in self.health.items()},
                           "checks": [asdict(c) for c in self.checks]})


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


def _check_probe(probe: Probe, classes: int) -> Probe:
    if len(probe) != 3:
        raise InputError(f"a probe is (candidate logits, serving logits, labels), got {len(probe)} items")
    cand = _as_logits(probe[0], "candidate probe logits")
    cur = metrics.check_logits(probe[1], "serving model's probe logits")
    if cand.shape != cur.shape or cand.shape[1] != classes:
        raise InputError(f"probe logits of the candidate {cand.shape} and the serving model {cur.shape} must "
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
    detail = (f"probe accuracy {cand_acc:.4f} vs serving {cur_acc:.4f} ({change:+.4f}; allowed drop "
              f"{config.max_accuracy_drop}) on {len(finite)} images")
    return Check("probe_accuracy", change >= threshold - _EPS, change, threshold, detail)


def _agreement_check(cand: np.ndarray, refs: dict[str, np.ndarray], config: GateConfig,
                     degenerate: dict[str, str]) -> Check:
    if not refs:
        why = "; ".join(f"{name}: {d}" for name, d in degenerate.items())
        names = "/".join(degenerate)
        return Check("agreement", False, None, None, f"skipped: no evidence: {names} degenerate ({why})",
                     skipped=True)
    best: tuple[float, float] | None = None
    parts = []
    for name, ref in refs.items():
        agree, chance, kappa = health.kappa(cand, ref)
        parts.append(f"top-1 agreement {agree:.4f} with the {name} model, chance {chance:.4f}, kappa {kappa:.4f}")
        if best is None or kappa > best[0]:
            best = (kappa, agree)
    assert best is not None
    return Check("agreement", best[0] >= config.min_kappa - _EPS, best[0], config.min_kappa,
                 "; ".join(parts) + f" (floor: kappa {config.min_kappa} with any reference)")


def _entropy_check(cand: Summary, refs: dict[str, Summary], config: GateConfig, collapsed: bool,
                   advisory: bool) -> Check:
    floor, detail = config.min_mean_entropy, f"floor {config.min_mean_entropy}"
    if refs:
        best = max(refs, key=lambda k: refs[k].mean_entropy)
        relative = config.min_entropy_ratio * refs[best].mean_entropy
        detail += f", and {config.min_entropy_ratio} x the {best} model's {refs[best].mean_entropy:.4f}"
        floor = max(floor, relative)
    detail = f"mean entropy {cand.mean_entropy:.4f} of log(C) ({detail})"
    if advisory and collapsed:
        detail += f" at top class share {cand.top_share:.2f}: collapsed, rejected whatever the probe says"
    return Check("mean_entropy", cand.mean_entropy >= floor - _EPS, cand.mean_entropy, floor, detail,
                 advisory=advisory and not collapsed)


def _diversity_checks(cand: Summary, refs: dict[str, Summary], config: GateConfig) -> list[Check]:
    if not refs:
        why = cand.degenerate(config.thresholds)
        detail = ("no non-degenerate reference, so the candidate must not be degenerate itself: "
                  + (why or f"top class share {cand.top_share:.2f}, mean entropy {cand.mean_entropy:.4f} "
                                f"of log(C)"))
        return [Check("class_entropy", why is None, cand.class_entropy, None, detail),
                Check("distinct_classes", why is None, float(cand.distinct), None, detail)]
    best_h = max(refs, key=lambda k: refs[k].class_entropy)
    best_d = max(refs, key=lambda k: refs[k].distinct)
    hr, dr = refs[best_h].class_entropy, refs[best_d].distinct
    t = config.min_class_entropy * hr
    # never one class where a reference has more
    td = max(min(2, dr), math.ceil(config.min_distinct_classes * dr - _EPS))
    return [Check("class_entropy", cand.class_entropy >= t - _EPS, cand.class_entropy, t,
                  f"class-histogram entropy {cand.class_entropy:.4f} of log(C), best reference {hr:.4f} "
                  f"({best_h}; floor {config.min_class_entropy} x reference = {t:.4f})"),
            Check("distinct_classes", cand.distinct >= td, float(cand.distinct), float(td),
                  f"{cand.distinct} distinct predicted classes, best reference {dr} ({best_d}; floor "
                  f"{config.min_distinct_classes} x reference, rounded up, at least 2 = {td})")]


def evaluate_gates(candidate_logits: np.ndarray, serving_logits: np.ndarray, config: GateConfig | None = None,
                   *, probe: Probe | None = None, source_logits: np.ndarray | None = None,
                   serving_input_shift: float | None = None) -> GateResult:
    """Run every gate on logits of one held-back slice through the candidate, the serving model and
    (optionally) the source model; see the module docstring. Non-finite candidate logits fail `finite`
    (the rest is then skipped); non-finite serving/source logits, mismatched shapes, a bad input shift or
    bad probe labels raise InputError, since those are the caller's to fix."""
    config = config or GateConfig()
    cand = _as_logits(candidate_logits, "candidate logits")
    models = {"serving": metrics.check_logits(serving_logits, "serving model's logits")}
    if source_logits is not None:
        models["source"] = metrics.check_logits(source_logits, "source model's logits")
    for name, arr in models.items():
        if arr.shape != cand.shape:
            raise InputError(f"candidate logits {cand.shape} and {name} model's logits {arr.shape} must have "
                             f"one shape: the same held-back frames through every model")
    if serving_input_shift is not None and not (math.isfinite(serving_input_shift) and serving_input_shift >= 0):
        raise InputError(f"serving_input_shift must be a finite number of sigmas >= 0, got {serving_input_shift}")
    n, classes = cand.shape
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
        checks += [_skip(name, "candidate logits are not finite") for name in GATE_NAMES[1:]]
        return GateResult(checks)
    if bad:
        cand = cand[rows]
        models = {name: arr[rows] for name, arr in models.items()}

    healths = {"candidate": health.summarize(cand)}
    healths.update({name: health.summarize(arr, serving_input_shift if name == "serving" else None)
                    for name, arr in models.items()})
    degenerate = {name: why for name in models
                  if (why := healths[name].degenerate(config.thresholds, config.max_input_shift)) is not None}
    refs = [name for name in models if name not in degenerate]

    ch = healths["candidate"]
    collapsed = ch.collapsed(config.thresholds)
    advisory = probe is not None  # the probe decides, except on a collapsed candidate
    unsupervised = [_entropy_check(ch, {r: healths[r] for r in refs}, config, collapsed, advisory)]
    unsupervised += [Check(c.name, c.passed, c.value, c.threshold, c.detail, c.skipped, advisory)
                     for c in (*_diversity_checks(ch, {r: healths[r] for r in refs}, config),
                               _agreement_check(cand, {r: models[r] for r in refs}, config, degenerate))]
    checks += unsupervised
    checks.append(_skip("probe_accuracy", "no labeled probe set") if probe is None else _probe_check(probe, config))
    return GateResult(checks, refs, degenerate, healths)


def serving_worse(result: GateResult, config: GateConfig | None = None) -> str | None:
    """Why the serving model answers far fewer classes than the unadapted (source) model on the slice that
    `result` judged: it fails both diversity checks (class-histogram entropy and distinct classes) with the
    source as its only reference. None when it does not, or when the source is absent or degenerate there.

    A model adapted well is at least about as diverse as the unadapted one on the frames it serves; one that
    is not was adapted into a corner (a learning rate x 1000 that slipped through a small slice after a shift
    and then served the next domains at chance), and the device loop falls back to its start model."""
    config = config or GateConfig()
    serving, source = result.health.get("serving"), result.health.get("source")
    if serving is None or source is None or "source" in result.degenerate:
        return None
    checks = _diversity_checks(serving, {"source": source}, config)
    if any(c.passed for c in checks):
        return None
    return "the serving model is less diverse than the unadapted one: " + "; ".join(
        c.detail.replace("best reference", "unadapted") for c in checks)


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
