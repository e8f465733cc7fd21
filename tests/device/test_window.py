"""A window's metrics record: bounded size whatever its frame count, exact per-window percentiles, and the
latency histogram it carries (bins, merge, percentiles within their stated error, JSON and its checks)."""

import json

import numpy as np
import pytest

from gprebn_edge.device.histogram import LAYOUT, MAX_RELATIVE_ERROR, N_BINS, LatencyHistogram
from gprebn_edge.device.window import Window
from gprebn_edge.errors import ArtifactError
from gprebn_edge.io import strict_json


def realistic_ms(rng, n):
    """Serving latencies: a lognormal body around 2 ms with a 1 % tail of 5-40 ms stalls."""
    ms = rng.lognormal(np.log(2.0), 0.25, n)
    tail = rng.random(n) < 0.01
    ms[tail] = rng.uniform(5, 40, tail.sum())
    return ms


def filled(n, rng, ms=None):
    w = Window()
    ms = realistic_ms(rng, n) if ms is None else ms
    for f in range(n):
        w.add(rng.normal(size=10).astype(np.float32), float(ms[f]), f % 3 == 0, int(f % 10), "clean#0", f)
    return w


def test_a_10000_frame_window_has_a_small_record():
    rng = np.random.default_rng(0)
    w = filled(10_000, rng)
    rec = w.record()
    assert len(strict_json(rec)) < 4096
    assert "idle_latencies_ms" not in rec and "adapting_latencies_ms" not in rec
    hist = rec["latency_hist_ms"]
    assert {k: hist[k] for k in LAYOUT} == LAYOUT
    idle = LatencyHistogram.from_json(hist["idle"], "idle")
    adapting = LatencyHistogram.from_json(hist["adapting"], "adapting")
    assert (idle.n, adapting.n) == (6666, 3334) == (rec["latency_idle_ms"]["n"], rec["latency_adapting_ms"]["n"])


def test_the_record_is_bounded_even_when_every_bin_is_used():
    rng = np.random.default_rng(1)
    ms = np.geomspace(0.001, 1e6, 20_000)  # every bin, both histograms, and beyond the range at both ends
    rec = filled(len(ms), rng, ms).record()
    assert len(rec["latency_hist_ms"]["idle"]) == len(rec["latency_hist_ms"]["adapting"]) == N_BINS
    assert len(strict_json(rec)) < 8192


def test_the_record_keeps_its_other_keys_and_exact_window_percentiles():
    rng = np.random.default_rng(2)
    ms = realistic_ms(rng, 250)
    rec = filled(250, rng, ms).record()
    assert {"n", "latency_ms", "latency_idle_ms", "latency_adapting_ms", "adapting_fraction", "mean_entropy",
            "non_finite", "labeled", "correct", "by_segment", "segment_frames", "latency_hist_ms"} == set(rec)
    assert rec["latency_ms"]["p99"] == np.percentile(ms, 99) and rec["latency_ms"]["p50"] == np.percentile(ms, 50)
    idle = ms[np.arange(250) % 3 != 0]
    lat = rec["latency_idle_ms"]
    assert (lat["p50"], lat["p99"], lat["n"]) == (np.percentile(idle, 50), np.percentile(idle, 99), len(idle))
    assert rec["labeled"] == 250 and rec["segment_frames"] == {"clean#0": [0, 250]}
    json.loads(strict_json(rec))


@pytest.mark.parametrize("q", [1, 50, 90, 99, 99.9])
def test_merged_percentiles_are_within_the_stated_error(q):
    rng = np.random.default_rng(3)
    parts = [realistic_ms(rng, 250) for _ in range(40)]
    merged = LatencyHistogram()
    for p in parts:
        merged.merge(LatencyHistogram.from_json(LatencyHistogram(p).to_json(), "x"))
    exact = np.percentile(np.concatenate(parts), q)
    assert merged.n == 10_000
    assert merged.percentile(q) == pytest.approx(exact, rel=MAX_RELATIVE_ERROR)
    assert MAX_RELATIVE_ERROR < 0.05


def test_histogram_edges_and_checks():
    h = LatencyHistogram([0.0, 1e-9, 1e9, float("inf")])
    assert h.to_json() == [[0, 2], [N_BINS - 1, 2]]
    assert LatencyHistogram().percentile(50) is None and LatencyHistogram([3.0]).percentile(99) == pytest.approx(
        3.0, rel=MAX_RELATIVE_ERROR)
    assert LatencyHistogram([1.0, 2.0]).merge(LatencyHistogram([2.0])) == LatencyHistogram([1.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        LatencyHistogram([float("nan")])
    for bad, why in (({"0": 1}, "must be a list"), ([[N_BINS, 1]], "0 <= bin < 187"), ([[3, -1]], "count >= 0"),
                     ([[1.5, 2]], "pairs"), ([[1, True]], "pairs"), ([[1]], "pairs")):
        with pytest.raises(ArtifactError, match=f"latency_hist_ms.idle.*{why}"):
            LatencyHistogram.from_json(bad, "log line 3: latency_hist_ms.idle")
