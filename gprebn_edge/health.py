"""Adaptation health: is the adapted model likely worse than the one it replaces?

`adapt` holds back a slice of the calibration images (it never adapts on them) and runs the unadapted and
the adapted model on that slice. With no labels, it can only compare what the two models say:

- mean prediction entropy and confidence (entropy minimization that ends with *higher* entropy on images it
  did not adapt on is the clearest sign that the new statistics do not describe the site);
- prediction diversity: how many classes are predicted and the entropy of the predicted-class histogram
  (a collapse onto one or two classes);
- top-1 agreement with the unadapted model (reported, never a signal by itself: under a strong shift the
  unadapted model is the one that is wrong);
- non-finite outputs.

The verdict is `ok` (no signal), `suspect` (written, with the signals in the artifact's metadata and a
warning that names them and what to try), `collapsed` (refused unless forced) or `non-finite` (always
refused). The thresholds below were set on the built-in benchmark and Fashion-MNIST shifts, where they
raised no false alarm (benchmarks/health.py measures catches and false alarms).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["HealthThresholds", "Profile", "profile", "assess", "advice", "OK", "SUSPECT", "COLLAPSED",
           "NON_FINITE", "holdout_size"]

OK, SUSPECT, COLLAPSED, NON_FINITE = "ok", "suspect", "collapsed", "non-finite"


@dataclass(frozen=True)
class HealthThresholds:
    """When a signal fires. Entropies are in units of ln(classes), so one setting fits 10 and 1000 classes."""

    uncertain: float = 0.7           # mean entropy after >= 0.7 ln K, and higher than before: near-uniform
    diversity_drop: float = 0.5      # histogram entropy after < 0.5 x before
    collapse_entropy: float = 0.1    # mean entropy < 0.1 ln K together with a diversity drop: collapsed
    min_images: int = 40             # fewer calibration images: no check (and a warning)


def holdout_size(n: int, fraction: float, cap: int = 500, floor: int = 16,
                 thresholds: HealthThresholds = HealthThresholds()) -> int:
    """Images to hold back from `n` calibration images: `fraction` of them, at least `floor`, at most `cap`;
    0 when there are too few images to spare any (then no health check runs)."""
    if fraction <= 0 or n < thresholds.min_images:
        return 0
    return int(min(cap, max(floor, round(fraction * n)), n // 2))


@dataclass
class Profile:
    """What one model says about the held-back images."""

    logits: torch.Tensor

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.logits).all())

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(1).numpy()

    def to_dict(self) -> dict[str, Any]:
        k = self.logits.shape[1]
        if not self.finite:
            return {"finite": False, "entropy": None, "confidence": None, "classes_predicted": None,
                    "histogram_entropy": None}
        p = self.logits.double().softmax(1)
        ent = float(-(p * p.clamp_min(1e-300).log()).sum(1).mean())
        counts = np.bincount(self.predictions, minlength=k)
        freq = counts[counts > 0] / counts.sum()
        diversity = float(-(freq * np.log(freq)).sum()) + 0.0  # + 0.0: a single class gives 0.0, not -0.0
        return {"finite": True, "entropy": ent, "confidence": float(p.amax(1).mean()),
                "classes_predicted": int((counts > 0).sum()), "histogram_entropy": diversity}


@torch.no_grad()
def profile(model: nn.Module, batches: Iterable[torch.Tensor]) -> Profile:
    """Run an eval-mode model over the held-back batches; its mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return Profile(torch.cat([model(x).float() for x in batches]))
    finally:
        model.train(was_training)


def assess(before: Profile, after: Profile, thresholds: HealthThresholds = HealthThresholds()) -> dict[str, Any]:
    """The health record stored in the artifact: both profiles, agreement, the signals that fired and the
    verdict."""
    k = before.logits.shape[1]
    b, a = before.to_dict(), after.to_dict()
    record: dict[str, Any] = {"images": int(before.logits.shape[0]), "classes": k, "before": b, "after": a,
                              "agreement": None, "signals": [], "verdict": OK,
                              "thresholds": {"uncertain_nats": thresholds.uncertain * math.log(k),
                                             "diversity_drop": thresholds.diversity_drop}}
    if not after.finite:
        record["signals"] = ["the adapted model's outputs are not finite (NaN or Inf)"]
        record["verdict"] = NON_FINITE
        return record
    record["agreement"] = float((before.predictions == after.predictions).mean())
    if not before.finite:  # nothing to compare with; the adapted model at least gives numbers
        return record
    signals = []
    if a["entropy"] > b["entropy"] and a["entropy"] >= thresholds.uncertain * math.log(k):
        signals.append(f"mean entropy rose from {b['entropy']:.2f} to {a['entropy']:.2f} nats under adaptation, "
                       f"close to uniform ({a['entropy'] / math.log(k):.0%} of ln {k})")
    diversity_fell = a["histogram_entropy"] < thresholds.diversity_drop * b["histogram_entropy"]
    if diversity_fell:
        signals.append(f"prediction diversity collapsed: {b['classes_predicted']} -> {a['classes_predicted']} "
                       f"classes predicted, class-histogram entropy {b['histogram_entropy']:.2f} -> "
                       f"{a['histogram_entropy']:.2f}")
    record["signals"] = signals
    if diversity_fell and a["entropy"] < thresholds.collapse_entropy * math.log(k):
        record["verdict"] = COLLAPSED
    elif signals:
        record["verdict"] = SUSPECT
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
