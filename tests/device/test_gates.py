"""device.gates on hand-built logits: each gate passing and failing, NaN, collapse, imbalanced slices,
the probe set, degenerate serving/source models (issue 11), and the recovery policy."""

import json
import math

import numpy as np
import pytest

from gprebn_edge.device.gates import GATE_NAMES, GateConfig, RecoveryPolicy, evaluate_gates
from gprebn_edge.errors import InputError

C = 10


def logits_for(pred: np.ndarray, margin: float = 3.0, classes: int = C) -> np.ndarray:
    """Logits predicting `pred` with a margin of `margin` over the other classes (0 otherwise)."""
    out = np.zeros((len(pred), classes))
    out[np.arange(len(pred)), pred] = margin
    return out


def balanced(n: int = 200) -> np.ndarray:
    return np.arange(n) % C


def failed(result) -> set[str]:
    """The checks that reject: failed, neither skipped nor advisory."""
    return {c.name for c in result.checks if not (c.passed or c.skipped or c.advisory)}


def test_identical_candidate_passes_every_gate():
    cur = logits_for(balanced())
    result = evaluate_gates(cur.copy(), cur)
    assert result.passed and result.reasons == []
    assert [c.name for c in result.checks] == list(GATE_NAMES)
    assert result.check("agreement").value == 1.0
    assert result.check("probe_accuracy").skipped
    assert result.check("class_entropy").value == pytest.approx(1.0)
    d = result.to_dict()
    assert json.loads(json.dumps(d)) == d and d["passed"] is True


def test_nan_candidate_fails_finite_and_skips_the_rest():
    cand = logits_for(balanced())
    cand[5, 2] = np.nan
    cand[7, 0] = np.inf
    result = evaluate_gates(cand, logits_for(balanced()))
    assert not result.passed
    assert failed(result) == {"finite"} and result.check("finite").value == 2
    assert all(c.skipped for c in result.checks[1:])
    assert len(result.reasons) == 1 and result.reasons[0].startswith("finite: 2 of 200 slice rows")


def test_non_finite_rows_may_be_dropped_when_not_required():
    cand = logits_for(balanced())
    cand[5] = np.nan
    result = evaluate_gates(cand, logits_for(balanced()), GateConfig(require_finite=False))
    assert result.passed and result.check("finite").value == 1
    assert result.check("agreement").value == 1.0  # over the 199 finite rows
    all_nan = np.full((4, C), np.nan)
    assert not evaluate_gates(all_nan, np.zeros((4, C)), GateConfig(require_finite=False)).passed


def test_collapsed_candidate_fails_entropy_and_diversity():
    cur = logits_for(balanced())
    cand = logits_for(np.zeros(200, dtype=int), margin=30.0)  # everything class 0, entropy ~0
    result = evaluate_gates(cand, cur)
    assert not result.passed
    assert {"mean_entropy", "class_entropy", "distinct_classes", "agreement"} <= failed(result)
    text = "\n".join(result.reasons)
    assert "mean entropy" in text and "class-histogram entropy" in text and "distinct predicted classes" in text
    assert result.check("distinct_classes").value == 1 and result.check("distinct_classes").threshold == 8


def test_mean_entropy_floor():
    preds = balanced()
    cur = logits_for(preds)
    sharp = logits_for(preds, margin=12.0)   # entropy ~ 9 * 12 * e^-12 nats: far below 2 % of log(10)
    mild = logits_for(preds, margin=4.5)     # 0.22 of log(10): 0.39 x the current model's 0.56
    assert failed(evaluate_gates(sharp, cur)) == {"mean_entropy"}
    assert evaluate_gates(mild, cur).passed
    assert evaluate_gates(sharp, cur, GateConfig(min_mean_entropy=0.0, min_entropy_ratio=0.0)).passed
    # far more certain than every reference on the same frames (0.066 vs 0.56 of log(10)): collapsing
    sharper = logits_for(preds, margin=6.0)
    result = evaluate_gates(sharper, cur)
    assert failed(result) == {"mean_entropy"} and "0.2 x the serving model's 0.5639" in result.reasons[0]
    assert evaluate_gates(sharper, cur, GateConfig(min_entropy_ratio=0.1)).passed


def test_diversity_drop_fails_but_imbalanced_healthy_slice_passes():
    # the current model sees an imbalanced slice: mostly class 3, some 7 and 1
    preds = np.array([3] * 170 + [7] * 20 + [1] * 10)
    cur = logits_for(preds)
    result = evaluate_gates(logits_for(preds), cur)
    assert result.passed  # class entropy ~0.26 of log(10): an absolute floor of 0.5 would have failed it
    assert result.check("class_entropy").value < 0.3
    # the candidate flips a few predictions within the same classes: still healthy
    cand = preds.copy()
    cand[:8] = 7
    assert evaluate_gates(logits_for(cand), cur).passed
    # halving diversity relative to a balanced current model fails both diversity checks
    narrow = balanced() % 3  # classes 0, 1, 2 only
    result = evaluate_gates(logits_for(narrow), logits_for(balanced()))
    assert failed(result) >= {"class_entropy", "distinct_classes"}


def test_reference_logits_set_the_diversity_floor():
    narrow_pred = balanced() % 2
    narrow = logits_for(narrow_pred)  # current model already down to two classes
    cand_pred = narrow_pred.copy()
    cand_pred[:40] = 0  # 60 % class 0, 40 % class 1, agreeing with it far above chance
    cand = logits_for(cand_pred)
    assert evaluate_gates(cand, narrow).passed
    result = evaluate_gates(cand, narrow, source_logits=logits_for(balanced()))
    assert failed(result) == {"class_entropy", "distinct_classes"}


def test_agreement_floor_with_chance_correction():
    cur_pred = balanced()
    rng = np.random.default_rng(0)
    unrelated = rng.integers(0, C, 200)
    result = evaluate_gates(logits_for(unrelated), logits_for(cur_pred))
    assert failed(result) == {"agreement"} and "kappa" in result.reasons[0]
    # a good candidate that disagrees with a poor current model: 25 % agreement, far above chance
    cand = cur_pred.copy()
    cand[50:] = (cand[50:] + 1) % C
    result = evaluate_gates(logits_for(cand), logits_for(cur_pred))
    assert result.passed and result.check("agreement").value == pytest.approx(1 / 6)  # kappa: (0.25 - 0.1) / 0.9
    assert "top-1 agreement 0.2500" in result.check("agreement").detail
    assert not evaluate_gates(logits_for(cand), logits_for(cur_pred), GateConfig(min_kappa=0.5)).passed
    # raw agreement at chance level is no evidence (a collapsed lr x 1000 candidate beside a two-class model)
    two = np.array([0] * 114 + [1] * 86)
    near_chance = np.array([0] * 65 + [1] * 49 + [0] * 49 + [1] * 37)
    result = evaluate_gates(logits_for(near_chance), logits_for(two))
    assert 0.5 < float((near_chance == two).mean()) and failed(result) == {"agreement"}
    # one class dominating the slice (95 %): the model is no reference, and a candidate as dominated by one
    # class is not swapped in on its word (a camera that sees one class rarely swaps: safe)
    a = np.array([3] * 190 + [5] * 10)
    b = a.copy()
    b[185:195] = [5] * 5 + [3] * 5
    result = evaluate_gates(logits_for(b), logits_for(a))
    assert result.references == [] and result.check("agreement").skipped
    assert failed(result) == {"class_entropy", "distinct_classes"}


def test_probe_accuracy_margin():
    preds = balanced()
    labels = preds.copy()
    cur_probe = logits_for(labels)          # 100 %
    worse = labels.copy()
    worse[:4] = (worse[:4] + 1) % C         # 98 %: exactly the allowed drop
    much_worse = labels.copy()
    much_worse[:6] = (much_worse[:6] + 1) % C  # 97 %
    slice_logits = logits_for(preds)
    ok = evaluate_gates(slice_logits, slice_logits, probe=(logits_for(worse), cur_probe, labels))
    assert ok.passed and ok.check("probe_accuracy").value == pytest.approx(-0.02)
    bad = evaluate_gates(slice_logits, slice_logits, probe=(logits_for(much_worse), cur_probe, labels))
    assert failed(bad) == {"probe_accuracy"} and "0.9700 vs serving 1.0000" in bad.reasons[0]
    nan_probe = logits_for(labels)
    nan_probe[0] = np.nan
    result = evaluate_gates(slice_logits, slice_logits, probe=(nan_probe, cur_probe, labels))
    assert failed(result) == {"finite"} and "1 probe rows" in result.reasons[0]
    relaxed = evaluate_gates(slice_logits, slice_logits, GateConfig(require_finite=False),
                             probe=(nan_probe, cur_probe, labels))
    assert relaxed.passed and relaxed.check("probe_accuracy").value == pytest.approx(-1 / 200)


def test_caller_errors_raise_input_error():
    a = logits_for(balanced())
    with pytest.raises(InputError, match="must have one shape"):
        evaluate_gates(a, a[:100])
    with pytest.raises(InputError, match="must have one shape"):
        evaluate_gates(a, logits_for(balanced(), classes=12))
    with pytest.raises(InputError, match="serving model's logits contain NaN"):
        bad = a.copy()
        bad[0, 0] = np.nan
        evaluate_gates(a, bad)
    with pytest.raises(InputError, match="at least 1 sample and 2 classes"):
        evaluate_gates(np.zeros((3, 1)), np.zeros((3, 1)))
    with pytest.raises(InputError, match="labels must lie in"):
        evaluate_gates(a, a, probe=(a, a, np.full(200, 11)))
    with pytest.raises(InputError, match="source model's logits"):
        evaluate_gates(a, a, source_logits=a[:10])
    with pytest.raises(InputError, match="min_kappa"):
        GateConfig(min_kappa=1.5)


def test_recovery_policy_counts_consecutive_failures():
    policy = RecoveryPolicy()
    assert [policy.record(p) for p in (False, False, True, False, False)] == [False] * 5
    assert policy.record(False) and policy.should_reset() and policy.consecutive_failures == 3
    policy.reset()
    assert not policy.should_reset() and policy.consecutive_failures == 0
    assert RecoveryPolicy(max_failures=1).record(False)
    with pytest.raises(InputError):
        RecoveryPolicy(max_failures=0)


def test_entropy_value_is_fraction_of_log_c():
    uniform = np.zeros((20, C))
    uniform[np.arange(20), np.arange(20) % C] = 1e-6  # nearly uniform, predictions still spread
    result = evaluate_gates(uniform, uniform)
    assert result.check("mean_entropy").value == pytest.approx(1.0, abs=1e-6)
    assert math.isclose(result.check("class_entropy").threshold, 0.8, rel_tol=1e-9)


# ---- issue 11: a serving model that is confidently wrong must not hold every candidate hostage

def confidently_one_class(n: int = 200, cls: int = 4) -> np.ndarray:
    """The unadapted model after the shift: class `cls` for everything, mean entropy ~0.01 of log(C)."""
    return logits_for(np.full(n, cls), margin=9.0)


def good_candidate(n: int = 200) -> np.ndarray:
    """Diverse, healthy, and agreeing with the collapsed serving model on only 10 % of the slice."""
    return logits_for(balanced(n))


def test_collapsed_serving_model_does_not_block_a_good_candidate():
    serving = confidently_one_class()
    result = evaluate_gates(good_candidate(), serving)
    assert result.passed, result.reasons
    assert result.health["serving"].mean_entropy < 0.02 and result.health["serving"].top_share == 1.0
    assert set(result.degenerate) == {"serving"} and result.references == []
    agreement = result.check("agreement")
    assert agreement.skipped and "no evidence: serving degenerate" in agreement.detail
    assert result.check("class_entropy").passed and result.check("distinct_classes").passed
    d = result.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert d["degenerate"]["serving"].startswith("one class for 100 % of the slice")
    assert d["health"]["candidate"]["distinct"] == C


def test_collapsed_serving_model_still_rejects_a_collapsed_candidate():
    serving = confidently_one_class()
    cand = logits_for(np.full(200, 7), margin=30.0)  # one other class, entropy ~0
    result = evaluate_gates(cand, serving)
    assert not result.passed
    assert {"mean_entropy", "class_entropy", "distinct_classes"} <= failed(result)
    assert "must not be degenerate itself" in result.check("class_entropy").detail
    # confident one-class outputs above the entropy floor are degenerate too when nothing vouches for them
    assert failed(evaluate_gates(logits_for(np.full(200, 7), margin=6.0), serving)) == {"class_entropy",
                                                                                        "distinct_classes"}


def test_probe_decides_even_when_agreement_with_serving_is_tiny():
    labels = balanced()
    serving_probe = labels.copy()
    serving_probe[:40] = (serving_probe[:40] + 1) % C  # 80 %
    cand_probe = labels.copy()
    cand_probe[:18] = (cand_probe[:18] + 1) % C        # 91 %: +0.11
    serving = logits_for(balanced())
    cand_pred = balanced().copy()
    keep = np.arange(200) % 20 == 0                    # agrees on 5 % only, well below chance-corrected floors
    cand_pred[~keep] = (cand_pred[~keep] + 3) % C
    result = evaluate_gates(logits_for(cand_pred), serving,
                            probe=(logits_for(cand_probe), logits_for(serving_probe), labels))
    assert result.passed and result.reasons == []
    assert result.check("probe_accuracy").value == pytest.approx(0.11)
    agreement = result.check("agreement")
    assert agreement.value < 0 and "top-1 agreement 0.0500" in agreement.detail and not agreement.passed
    assert result.check("agreement").advisory and result.advisories[0].startswith("agreement: ")


def test_probe_does_not_rescue_a_collapsed_candidate():
    labels = balanced()
    cur = labels.copy()
    cur[:40] = (cur[:40] + 1) % C
    collapsed = logits_for(np.zeros(200, dtype=int), margin=30.0)
    result = evaluate_gates(collapsed, logits_for(balanced()),
                            probe=(logits_for(labels), logits_for(cur), labels))  # probe +0.20
    assert not result.passed and result.check("probe_accuracy").passed
    assert failed(result) == {"mean_entropy"} and "collapsed, rejected whatever the probe" in result.reasons[0]


def test_serving_far_from_its_bn_statistics_is_no_evidence():
    serving = logits_for(balanced())
    rng = np.random.default_rng(2)
    unrelated = logits_for(rng.integers(0, C, 200))
    assert failed(evaluate_gates(unrelated, serving, serving_input_shift=0.05)) == {"agreement"}
    result = evaluate_gates(unrelated, serving, serving_input_shift=2.5)
    assert result.passed and set(result.degenerate) == {"serving"}
    assert "input statistics 2.50 sigma" in result.degenerate["serving"]
    assert result.health["serving"].input_shift == 2.5
    assert not evaluate_gates(unrelated, serving, GateConfig(max_input_shift=3.0), serving_input_shift=2.5).passed
    with pytest.raises(InputError, match="serving_input_shift"):
        evaluate_gates(unrelated, serving, serving_input_shift=float("nan"))
    # the source model is judged by its outputs only: unless it collapsed, it is evidence on any domain
    result = evaluate_gates(unrelated, serving, source_logits=serving, serving_input_shift=0.3)
    assert failed(result) == {"agreement"} and set(result.degenerate) == {"serving"} and result.references == ["source"]


def test_healthy_source_keeps_unrelated_candidates_out():
    serving = confidently_one_class()
    source = logits_for(balanced())
    rng = np.random.default_rng(3)
    unrelated = logits_for(rng.integers(0, C, 200))
    result = evaluate_gates(unrelated, serving, source_logits=source)
    assert failed(result) == {"agreement"} and result.references == ["source"]
    assert "with the source model" in result.check("agreement").detail
    # a candidate that follows the source on most frames passes on the source's evidence
    near = balanced().copy()
    near[:60] = (near[:60] + 1) % C
    assert evaluate_gates(logits_for(near), serving, source_logits=source).passed
    # both degenerate: agreement is skipped and the detail names both
    result = evaluate_gates(good_candidate(), serving, source_logits=confidently_one_class(cls=2))
    assert result.passed and "no evidence: serving/source degenerate" in result.check("agreement").detail


def test_new_thresholds_are_validated():
    for kw, name in (({"degenerate_top_share": 1.5}, "degenerate_top_share"),
                     ({"max_input_shift": 0.0}, "max_input_shift")):
        with pytest.raises(InputError, match=name):
            GateConfig(**kw)
