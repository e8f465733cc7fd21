"""The adaptation health check: each signal fires on what it describes and stays quiet otherwise."""

import math

import pytest
import torch

from gprebn_edge.health import (
    COLLAPSED,
    NON_FINITE,
    OK,
    SUSPECT,
    HealthThresholds,
    Profile,
    advice,
    assess,
    holdout_size,
)


def _confident(labels, k=10, margin=8.0):
    logits = torch.zeros(len(labels), k)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = margin
    return Profile(logits)


def test_a_better_spread_model_is_ok():
    before = _confident([i % 3 for i in range(60)])  # degenerate: three classes
    after = _confident([i % 10 for i in range(60)], margin=3.0)  # less confident, all classes
    record = assess(before, after)
    assert record["verdict"] == OK and record["signals"] == []
    assert record["agreement"] == pytest.approx(sum(i % 3 == i % 10 for i in range(60)) / 60)
    assert record["before"]["classes_predicted"] == 3 and record["after"]["classes_predicted"] == 10


def test_near_uniform_after_adaptation_is_suspect():
    before = _confident([i % 10 for i in range(60)])
    after = Profile(torch.randn(60, 10) * 0.1)  # almost uniform
    record = assess(before, after)
    assert record["verdict"] == SUSPECT
    assert "entropy rose" in record["signals"][0] and "close to uniform" in record["signals"][0]
    assert "--theta" in advice(record)


def test_entropy_rising_but_still_confident_is_not_flagged():
    before = _confident([i % 10 for i in range(60)], margin=9.0)
    after = _confident([i % 10 for i in range(60)], margin=4.0)
    assert after.to_dict()["entropy"] < HealthThresholds().uncertain * math.log(10)
    assert assess(before, after)["verdict"] == OK


def test_diversity_collapse_is_suspect_and_with_low_entropy_collapsed():
    before = _confident([i % 10 for i in range(60)])
    soft = Profile(_confident([0] * 58 + [1, 2], margin=1.5).logits)
    assert assess(before, soft)["verdict"] == SUSPECT
    hard = _confident([0] * 60, margin=30.0)
    record = assess(before, hard)
    assert record["verdict"] == COLLAPSED and "diversity collapsed" in record["signals"][0]
    assert "--lr" in advice(record)


def test_non_finite_outputs():
    before = _confident([i % 10 for i in range(20)])
    bad = before.logits.clone()
    bad[3, 2] = float("nan")
    record = assess(before, Profile(bad))
    assert record["verdict"] == NON_FINITE and record["after"]["finite"] is False and record["agreement"] is None


@pytest.mark.parametrize("n,fraction,expected", [(1000, 0.1, 100), (100, 0.1, 16), (39, 0.1, 0), (20000, 0.1, 500),
                                                 (1000, 0.0, 0), (40, 0.5, 20)])
def test_holdout_size(n, fraction, expected):
    assert holdout_size(n, fraction) == expected
