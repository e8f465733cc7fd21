"""The adaptation health check: each signal fires on what it describes and stays quiet otherwise."""

import math

import numpy as np
import pytest

from gprebn_edge.device.gates import GateConfig
from gprebn_edge.health import (
    COLLAPSED,
    NON_FINITE,
    OK,
    SUSPECT,
    Thresholds,
    advice,
    assess,
    holdout_size,
    summarize,
)


def _confident(labels, k=10, margin=8.0):
    logits = np.zeros((len(labels), k))
    logits[np.arange(len(labels)), np.asarray(labels)] = margin
    return logits


def test_a_better_spread_model_is_ok():
    before = _confident([i % 3 for i in range(60)])  # three classes
    after = _confident([i % 10 for i in range(60)], margin=3.0)  # less confident, all classes
    record = assess(before, after)
    assert record["verdict"] == OK and record["signals"] == [] and record["unsupervised_verdict"] == OK
    assert record["agreement"] == pytest.approx(sum(i % 3 == i % 10 for i in range(60)) / 60)
    assert record["before"]["classes_predicted"] == 3 and record["after"]["classes_predicted"] == 10
    assert record["labeled"] is None


def test_near_uniform_after_adaptation_is_suspect():
    before = _confident([i % 10 for i in range(60)])
    after = np.random.default_rng(0).normal(size=(60, 10)) * 0.1  # almost uniform
    record = assess(before, after)
    assert record["verdict"] == SUSPECT
    assert "entropy rose" in record["signals"][0] and "close to uniform" in record["signals"][0]
    assert "--theta" in advice(record)


def test_entropy_rising_but_still_confident_is_not_flagged():
    before = _confident([i % 10 for i in range(60)], margin=9.0)
    after = _confident([i % 10 for i in range(60)], margin=4.0)
    assert summarize(after).mean_entropy < Thresholds().uncertain
    assert assess(before, after)["verdict"] == OK


def test_diversity_collapse_is_suspect_and_with_low_entropy_collapsed():
    before = _confident([i % 10 for i in range(60)])
    soft = _confident([0] * 40 + [1] * 20, margin=1.5)
    assert assess(before, soft)["verdict"] == SUSPECT
    hard = _confident([0] * 60, margin=30.0)
    record = assess(before, hard)
    assert record["verdict"] == COLLAPSED and "collapsed" in record["signals"][0]
    assert "--lr" in advice(record)


def test_confidently_different_from_a_weak_but_not_degenerate_unadapted_model_is_collapsed():
    """The issue's case: under a strong shift the unadapted model predicts 4 classes (one for 78 %); --lr x 1000
    leaves 2 classes at near-zero entropy that agree with it only at chance. Diversity did not halve, so the
    relative signals alone passed it as ok."""
    rng = np.random.default_rng(1)
    before_classes = rng.choice([0, 1, 2, 3], size=64, p=[0.78, 0.1, 0.06, 0.06])
    before = _confident(before_classes, margin=3.0)
    after = _confident(rng.choice([4, 5], size=64), margin=12.0)
    record = assess(before, after)
    assert summarize(before).degenerate(Thresholds()) is None
    assert record["verdict"] == COLLAPSED, record["signals"]
    assert any("confidently different" in s for s in record["signals"])
    assert record["kappa"] < Thresholds().min_kappa


def test_near_certain_where_a_degenerate_unadapted_model_was_not_is_collapsed():
    """A degenerate unadapted model (one class) is no reference; the absolute floor still catches the collapse."""
    before = _confident([0] * 60, margin=2.0)  # one class, but not certain
    after = _confident([i % 2 for i in range(60)], margin=20.0)  # two classes, certain of everything
    assert summarize(before).degenerate(Thresholds()) is not None
    record = assess(before, after)
    assert record["verdict"] == COLLAPSED and "near-certain" in record["signals"][0]


def test_a_confident_model_on_easy_images_staying_confident_is_ok():
    """Both models near-certain (easy images): the absolute floor only fires when adaptation made it so."""
    labels = [i % 10 for i in range(60)]
    record = assess(_confident(labels, margin=20.0), _confident(labels, margin=22.0))
    assert record["verdict"] == OK, record["signals"]


def test_one_class_dominating_where_the_unadapted_model_spread_is_suspect():
    before = _confident([i % 10 for i in range(60)], margin=3.0)
    after = _confident([0] * 57 + [1, 2, 3], margin=3.0)
    record = assess(before, after)
    assert record["verdict"] in (SUSPECT, COLLAPSED) and any("one class for 95%" in s for s in record["signals"])


def test_labels_give_the_verdict_on_held_back_accuracy():
    labels = np.array([i % 10 for i in range(100)])
    before = _confident(labels)
    worse = labels.copy()
    worse[:5] = (worse[:5] + 1) % 10  # 5 points lost
    record = assess(before, _confident(worse), labels)
    assert record["labeled"] == {"images": 100, "accuracy_before": 1.0, "accuracy_after": 0.95}
    assert record["verdict"] == SUSPECT and record["unsupervised_verdict"] == OK
    assert "held-back accuracy fell from 100.0% to 95.0%" in record["signals"][0]
    worse[:20] = (labels[:20] + 1) % 10  # 20 points lost: refused
    record = assess(before, _confident(worse), labels)
    assert record["verdict"] == COLLAPSED and record["unsupervised_verdict"] == OK


def test_one_image_of_labeled_noise_or_a_gain_fires_nothing():
    labels = np.array([i % 10 for i in range(40)])
    worse = labels.copy()
    worse[0] = 1  # one image: 2.5 points on 40 images, but one image is not a measurement
    assert assess(_confident(labels), _confident(worse), labels)["verdict"] == OK
    assert assess(_confident(worse), _confident(labels), labels)["verdict"] == OK


def test_a_drop_to_near_chance_is_collapsed():
    labels = np.array([i % 10 for i in range(100)])
    before = _confident(np.where(np.arange(100) < 20, labels, (labels + 1) % 10))  # 20 % accurate
    after = _confident(np.where(np.arange(100) < 12, labels, (labels + 1) % 10))  # 12 %: 8 points, near chance
    record = assess(before, after, labels)
    assert record["verdict"] == COLLAPSED and "near chance" in record["signals"][-1]


def test_a_labeled_gain_vouches_for_an_unsupervised_signal_but_not_for_a_one_class_model():
    labels = np.array([i % 2 for i in range(60)])
    before = _confident([0] * 60, margin=2.0)  # 50 % accurate
    after = _confident(labels, margin=20.0)  # near-certain (collapsed without labels), 100 % accurate
    record = assess(before, after, labels)
    assert record["unsupervised_verdict"] == COLLAPSED and record["verdict"] == SUSPECT
    one_class = _confident([0] * 60, margin=30.0)
    record = assess(_confident([i % 10 for i in range(60)], margin=2.0), one_class, np.zeros(60, int))
    assert record["labeled"]["accuracy_after"] == 1.0 and record["verdict"] == COLLAPSED


def test_labels_that_do_not_name_the_models_classes_are_ignored():
    logits = _confident([i % 10 for i in range(60)])
    record = assess(logits, logits, np.full(60, 10))
    assert record["labeled"] is None and record["verdict"] == OK


def test_non_finite_outputs():
    before = _confident([i % 10 for i in range(20)])
    bad = before.copy()
    bad[3, 2] = float("nan")
    record = assess(before, bad)
    assert record["verdict"] == NON_FINITE and record["after"]["finite"] is False and record["agreement"] is None


def test_the_loop_gates_judge_by_the_same_floors():
    t, g = Thresholds(), GateConfig()
    assert g.thresholds == Thresholds(min_mean_entropy=t.min_mean_entropy, degenerate_top_share=t.degenerate_top_share,
                                      max_accuracy_drop=t.max_accuracy_drop)
    assert (g.min_mean_entropy, g.degenerate_top_share, g.max_accuracy_drop) == (
        t.min_mean_entropy, t.degenerate_top_share, t.max_accuracy_drop)
    collapsed = summarize(_confident([0] * 60, margin=30.0))
    assert collapsed.collapsed(t) and collapsed.degenerate(t) is not None
    assert math.isclose(summarize(_confident([i % 10 for i in range(60)], margin=0.0)).mean_entropy, 1.0)


@pytest.mark.parametrize("n,fraction,expected", [(1000, 0.1, 100), (100, 0.1, 16), (39, 0.1, 0), (20000, 0.1, 500),
                                                 (1000, 0.0, 0), (40, 0.5, 20)])
def test_holdout_size(n, fraction, expected):
    assert holdout_size(n, fraction) == expected
