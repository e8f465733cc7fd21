"""runtime.metrics against hand-computed small examples and edge cases."""

import math

import numpy as np
import pytest

from gprebn_edge.errors import InputError
from gprebn_edge.runtime import metrics

LN3 = math.log(3.0)


def test_softmax_is_stable_and_exact():
    p = metrics.softmax(np.array([[0.0, LN3], [1000.0, 1000.0 + LN3], [-1000.0, -1000.0 + LN3]]))
    np.testing.assert_allclose(p, [[0.25, 0.75]] * 3, rtol=1e-12)
    p = metrics.softmax(np.array([[0.0, 800.0]], dtype=np.float32))  # exp(800) overflows float32 and float64
    assert np.isfinite(p).all() and p[0, 1] == 1.0
    half = metrics.softmax(np.array([[0.0, LN3]], dtype=np.float16))
    assert half.dtype == np.float32 and np.allclose(half, [[0.25, 0.75]], atol=1e-3)


def test_entropy_and_confidence():
    h = metrics.entropy(np.array([[0.0, LN3]]))
    np.testing.assert_allclose(h, [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))], rtol=1e-12)
    for c in (2, 7, 1000):
        np.testing.assert_allclose(metrics.entropy(np.full((3, c), 2.5)), [math.log(c)] * 3, rtol=1e-12)
        np.testing.assert_allclose(metrics.confidence(np.zeros((1, c))), [1 / c], rtol=1e-12)
    peaked = metrics.entropy(np.array([[0.0, 1e4, 0.0]]))
    assert np.isfinite(peaked).all() and peaked[0] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(metrics.confidence(np.array([[0.0, LN3], [LN3, 0.0]])), [0.75, 0.75])


# predictions 0, 2, 1, 1 (four classes)
LOGITS = np.array([[3.0, 0, 0, 0], [0, 1, 2, 0], [0, 5, 0, 0], [1, 2, 0, 0]])


def test_accuracy_and_per_class():
    labels = np.array([0, 1, 1, 1])
    assert metrics.accuracy(LOGITS, labels) == 0.75
    assert metrics.accuracy(LOGITS, np.array([0, 2, 1, 1])) == 1.0
    per_class = metrics.per_class_accuracy(LOGITS, labels)
    np.testing.assert_allclose(per_class[:2], [1.0, 2 / 3])
    assert per_class.shape == (4,) and np.isnan(per_class[2:]).all()  # classes without samples: NaN
    np.testing.assert_array_equal(
        metrics.per_class_accuracy_from_predictions(np.array([0, 2, 1, 1]), labels, 4)[:2], per_class[:2])


def test_agreement():
    other = np.array([[3.0, 0, 0, 0], [0, 0, 0, 9], [0, 0, 1, 0], [1, 2, 0, 0]])  # 0, 3, 2, 1
    assert metrics.agreement(LOGITS, other) == 0.5
    assert metrics.agreement(LOGITS, LOGITS) == 1.0
    with pytest.raises(InputError, match="shapes"):
        metrics.agreement(LOGITS, other[:3])


def test_ece_by_hand():
    # four samples at confidence 0.75, all right (gap 0.25); two at 0.5, both wrong (gap 0.5)
    logits = np.array([[0.0, LN3]] * 4 + [[0.0, 0.0]] * 2)
    labels = np.array([1, 1, 1, 1, 1, 1])
    assert metrics.expected_calibration_error(logits, labels) == pytest.approx((4 * 0.25 + 2 * 0.5) / 6)
    rel = metrics.reliability(logits, labels)
    assert len(rel.count) == 15 and rel.count.sum() == 6
    assert rel.count[11] == 4 and rel.count[7] == 2  # 0.75 in (11/15, 12/15], 0.5 in (7/15, 8/15]
    np.testing.assert_allclose(rel.accuracy[[11, 7]], [1.0, 0.0])
    np.testing.assert_allclose(rel.confidence[[11, 7]], [0.75, 0.5])
    assert np.isnan(rel.accuracy[0]) and np.isnan(rel.confidence[0]) and rel.ece == pytest.approx(1 / 3)


def test_ece_perfectly_calibrated_is_zero():
    # confidence 0.75 with 3 of 4 right, confidence 0.5 with 1 of 2 right
    logits = np.array([[0.0, LN3]] * 4 + [[0.0, 0.0]] * 2)
    labels = np.array([1, 1, 1, 0, 0, 1])
    assert metrics.expected_calibration_error(logits, labels) == pytest.approx(0.0, abs=1e-12)
    # all right at confidence ~1
    assert metrics.expected_calibration_error(np.array([[50.0, 0.0], [0.0, 50.0]]), np.array([0, 1])) < 1e-12


def test_reliability_bin_edges():
    edges = np.linspace(0, 1, 16)
    rel = metrics.reliability_from_confidence(np.array([edges[6], edges[6] + 1e-9, 1.0, 0.0]),
                                              np.array([True, False, True, True]))
    assert rel.count[5] == 1 and rel.count[6] == 1 and rel.count[14] == 1 and rel.count[0] == 1  # (lo, hi]
    assert metrics.reliability_from_confidence(np.array([0.5]), np.array([1]), bins=1).count.tolist() == [1]
    with pytest.raises(InputError, match="bins"):
        metrics.reliability_from_confidence(np.array([0.5]), np.array([1]), bins=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_refused(bad):
    logits = np.zeros((5, 3))
    logits[2, 1] = bad
    for fn in (metrics.softmax, metrics.entropy, metrics.confidence, metrics.class_histogram):
        with pytest.raises(InputError, match="NaN or Inf in 1 of 5 samples"):
            fn(logits)
    with pytest.raises(InputError, match="NaN or Inf"):
        metrics.accuracy(logits, np.zeros(5, dtype=np.int64))
    with pytest.raises(InputError, match="logits of B contain NaN or Inf"):
        metrics.agreement(np.zeros((5, 3)), logits)


def test_bad_shapes_and_labels():
    for shape in ((0, 3), (3,), (2, 3, 4), (3, 0)):
        with pytest.raises(InputError, match="non-empty"):
            metrics.entropy(np.zeros(shape))
    with pytest.raises(InputError, match="numbers"):
        metrics.entropy(np.array([["a", "b"]]))
    with pytest.raises(InputError, match=r"\(4,\) array"):
        metrics.accuracy(LOGITS, np.array([0, 1, 1]))
    with pytest.raises(InputError, match=r"\[0, 4\) for a 4-class model"):
        metrics.accuracy(LOGITS, np.array([0, 1, 1, 4]))
    with pytest.raises(InputError, match="integers"):
        metrics.per_class_accuracy(LOGITS, np.array([0.0, 1.0, 1.0, 1.0]))


def test_collapse_statistics():
    collapsed = np.tile([0.0, 9.0, 0.0], (6, 1))
    assert metrics.predicted_class_entropy(collapsed) == 0.0 and metrics.distinct_classes(collapsed) == 1
    np.testing.assert_array_equal(metrics.class_histogram(collapsed), [0, 6, 0])
    spread = np.eye(3)[[0, 1, 2, 0, 1, 2]]
    assert metrics.predicted_class_entropy(spread) == pytest.approx(LN3)
    assert metrics.distinct_classes(spread) == 3
    assert metrics.histogram_entropy(np.array([1, 1, 2])) == pytest.approx(-(2 * 0.25 * math.log(0.25)
                                                                               + 0.5 * math.log(0.5)))
    for bad in ([0, 0], [], [1, -1]):
        with pytest.raises(InputError, match="histogram"):
            metrics.histogram_entropy(np.array(bad))


def test_latency_summary_percentiles_and_moments():
    s = metrics.latency_summary([4.0, 1.0, 3.0, 2.0])
    assert list(s) == ["p50", "p90", "p99", "mean", "std", "min", "max", "n"]
    assert s["p50"] == pytest.approx(2.5) and s["p90"] == pytest.approx(3.7)  # linear interpolation
    assert (s["mean"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 4.0, 4)
    assert s["std"] == pytest.approx(np.std([1, 2, 3, 4]))  # population std, as bench's CV
    t = metrics.latency_summary(np.arange(101.0), quantiles=(50, 99.9))
    assert (t["p50"], t["p99.9"]) == pytest.approx((50.0, 99.9))


def test_latency_summary_rejects_empty_and_non_finite():
    with pytest.raises(InputError, match="no latencies"):
        metrics.latency_summary([])
    assert metrics.latency_summary([], allow_empty=True) is None
    assert metrics.latency_summary([2.0], allow_empty=True) == metrics.latency_summary([2.0])
    with pytest.raises(InputError, match=r"2 of 3 latencies are NaN or infinite"):
        metrics.latency_summary([1.0, float("nan"), float("inf")])
    with pytest.raises(InputError, match="quantiles"):
        metrics.latency_summary([1.0], quantiles=(50, 101))


def test_paired_ratio_cancels_drift_and_flags_a_misleading_ratio_of_medians():
    drift = np.linspace(0.1, 0.2, 101)
    r = metrics.paired_ratio(drift, 1.1 * drift)
    assert r["ratio"] == pytest.approx(1.1) and r["ratio_cv"] == pytest.approx(0, abs=1e-12)
    assert r["ratio_ci95"] == pytest.approx([1.1, 1.1]) and r["ratio_of_medians_in_ci"]
    a = [1.0] * 52 + [2.0] * 49  # A's median in the fast mode,
    b = [1.0] * 49 + [2.0] * 52  # B's in the slow one: the pairs still agree in 98 of 101 rounds
    r = metrics.paired_ratio(a, b)
    assert r["ratio"] == 1.0 and r["ratio_of_medians"] == 2.0 and not r["ratio_of_medians_in_ci"]
    with pytest.raises(InputError, match="equally long"):
        metrics.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(InputError, match="NaN"):
        metrics.paired_ratio([1.0, float("nan")], [1.0, 1.0])
