"""runtime.compare on two real ONNX exports of one adapted artifact (adapted and unadapted), plus fakes for
what real models rarely do (non-finite logits, a fixed batch size)."""

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import collect, open_source
from gprebn_edge.errors import InputError, MissingDependencyError
from gprebn_edge.runtime import metrics
from gprebn_edge.runtime.base import Runner, RunnerInfo, TensorInfo
from gprebn_edge.runtime.compare import CompareResult, compare, write_json
from gprebn_edge.runtime.compare_plot import plot_compare
from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner

DATA = "synthetic:gaussian_noise:5:split=test"


@pytest.fixture(scope="session")
def data(models):
    return open_source(DATA, models[2], limit=256)


@pytest.fixture(scope="session")
def result(models, data):
    calls = []
    out = compare(OnnxRuntimeRunner(models[0]), OnnxRuntimeRunner(models[1]), data, batch=64, latency_iters=10,
                  names=("source", "adapted"), progress=lambda *a: calls.append(a))
    assert calls[0][0] == "accuracy" and ("accuracy", 256, 256) in calls and calls[-1] == ("latency", 10, 10)
    return out


def _logits(path, images):
    with OnnxRuntimeRunner(path) as r:
        return r.infer(images)


def test_adapted_beats_unadapted_and_matches_direct_metrics(models, data, result):
    images, labels = collect(data)
    src, ada = _logits(models[0], images), _logits(models[1], images)
    a, b = result.a, result.b
    assert result.images == 256 and result.num_classes == 10 and result.has_labels
    assert result.input_shape == [3, 32, 32]
    assert b.accuracy > a.accuracy + 0.2  # adaptation to gaussian noise is the point of the tool
    assert a.accuracy == metrics.accuracy(src, labels) and b.accuracy == metrics.accuracy(ada, labels)
    assert a.error == pytest.approx(1 - a.accuracy)
    assert 0.0 <= result.agreement <= 1.0 and result.agreement == metrics.agreement(src, ada)
    assert a.ece == pytest.approx(metrics.expected_calibration_error(src, labels), abs=1e-6)
    assert b.mean_entropy == pytest.approx(float(metrics.entropy(ada).mean()), rel=1e-5)
    assert b.mean_confidence == pytest.approx(float(metrics.confidence(ada).mean()), rel=1e-5)
    want = metrics.per_class_accuracy(ada, labels)
    assert b.per_class_accuracy == pytest.approx([None if np.isnan(v) else v for v in want])
    assert sum(b.reliability["count"]) == 256 and len(b.reliability["edges"]) == 16
    assert b.predicted_classes == metrics.distinct_classes(ada)
    assert b.runner["backend"] == "onnxruntime" and b.runner["details"]["path"] == models[1]
    lat = result.latency
    assert lat["rounds"] == 10 and lat["batch"] == 1 and lat["order"] == "ABBA"
    lo, hi = lat["ratio_ci95"]
    assert 0 < lo <= hi and lat["ratio"] > 0
    for m in result.models:
        assert 0 < m.latency_ms["min"] <= m.latency_ms["p50"] <= m.latency_ms["p90"]


def test_model_against_itself(models, data):
    r = compare(OnnxRuntimeRunner(models[1]), OnnxRuntimeRunner(models[1]), data, latency_iters=4)
    assert r.agreement == 1.0
    a, b = r.a.__dict__.copy(), r.b.__dict__.copy()
    for d in (a, b):
        del d["name"], d["latency_ms"]
    assert a == b
    shared = OnnxRuntimeRunner(models[1])  # one runner on both sides, left inactive afterwards
    assert compare(shared, shared, data, latency_iters=0).agreement == 1.0 and not shared.active


class _Counting(OnnxRuntimeRunner):
    calls = 0

    def _infer(self, batch):
        _Counting.calls += 1
        return super()._infer(batch)


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    """Tiny ONNX classifiers: one with 7 classes, one taking 16x16 images."""
    folder = tmp_path_factory.mktemp("other")
    out = {}
    for name, classes, size in (("seven", 7, 32), ("small", 10, 16)):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))
        path = folder / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
            torch.onnx.export(model.eval(), (torch.zeros(1, 3, size, size),), str(path), dynamo=False,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        out[name] = str(path)
    return out


def test_mismatches_fail_before_any_inference(models, data, other_models):
    _Counting.calls = 0
    with pytest.raises(InputError) as e:
        compare(_Counting(models[0]), _Counting(other_models["seven"]), data)
    msg = str(e.value)
    assert "\n" not in msg and "(batch, 10)" in msg and "(batch, 7)" in msg
    with pytest.raises(InputError) as e:
        compare(_Counting(other_models["small"]), _Counting(models[1]), data)
    assert "(batch, 3, 16, 16)" in str(e.value) and "(batch, 3, 32, 32)" in str(e.value)
    resized = open_source(DATA, Preprocess(resize=24, mean=models[2].mean, std=models[2].std), limit=8)
    with pytest.raises(InputError, match=r"images are \(batch, 3, 24, 24\) but the models expect"):
        compare(_Counting(models[0]), _Counting(models[1]), resized)
    assert _Counting.calls == 0


def test_without_labels(models, data):
    r = compare(OnnxRuntimeRunner(models[0]), OnnxRuntimeRunner(models[1]), data, labels=False, latency_iters=0)
    assert not r.has_labels and r.latency is None
    for m in r.models:
        assert m.accuracy is None and m.error is None and m.ece is None and m.per_class_accuracy is None
        assert m.reliability is None and m.latency_ms is None and 0 < m.mean_confidence <= 1
    md = r.to_markdown()
    assert "accuracy" not in md and "| mean confidence |" in md and "Latency" not in md


def test_json_round_trip(result, tmp_path):
    path = tmp_path / "compare.json"
    write_json(result, path)
    loaded = json.loads(path.read_text())
    assert loaded == result.to_dict()
    assert CompareResult.from_dict(loaded) == result
    assert [p.name for p in tmp_path.iterdir()] == ["compare.json"]


def test_markdown(result):
    md = result.to_markdown()
    assert md.startswith("| | source | adapted |")
    for row in ("| top-1 accuracy |", "| top-1 error |", "| ECE (15 bins) |", "| mean entropy (nats) |",
                "| mean confidence |", "| predicted classes |", "| latency p50 (ms, batch 1) |",
                "| latency p90 (ms) |"):
        assert row in md
    assert f"| top-1 accuracy | {100 * result.a.accuracy:.2f} % | {100 * result.b.accuracy:.2f} % |" in md
    assert "Agreement (same top-1 class)" in md and "Latency adapted / source, paired (median of paired ratios)" in md
    assert "ratio of the p50s in the table" in md and "n/a" not in md
    assert "| class | source | adapted |" in md and md.count("\n| ") >= 10 + 8


def test_plot_is_png(result, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "compare.png"
    plot_compare(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    unlabeled = CompareResult.from_dict({**result.to_dict(), "has_labels": False, "latency": None})
    plot_compare(unlabeled, tmp_path / "unlabeled.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.png", "unlabeled.png"]


def test_plot_without_matplotlib(result, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[plot\]"):
        plot_compare(result, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


class _Fake(Runner):
    """A runner with given shapes whose logits come from a function of the batch."""

    name = "fake"

    def __init__(self, fn, batch=None, classes=10):
        super().__init__()
        self.fn, self.batch, self.classes, self.seen = fn, batch, classes, []

    def _activate(self):
        pass

    def _infer(self, x):
        assert self.batch is None or len(x) == self.batch
        self.seen.append(len(x))
        return self.fn(x)

    def inputs(self):
        return [TensorInfo("input", (self.batch or "batch", 3, 32, 32), "float32")]

    def outputs(self):
        return [TensorInfo("logits", (self.batch or "batch", self.classes), "float32")]

    def info(self):
        return RunnerInfo(backend="fake", device="cpu")


def _by_mean(x):
    """Logits that depend on each image, so padding or reordering would show."""
    m = x.reshape(len(x), -1).mean(axis=1)
    return np.stack([np.cos(m * (k + 1)) for k in range(10)], axis=1).astype(np.float32)


def test_fixed_batch_runner_is_fed_padded_chunks(models):
    data = open_source(DATA, models[2], limit=10)
    fixed = _Fake(_by_mean, batch=4)
    r = compare(_Fake(_by_mean), fixed, data, batch=8, latency_iters=2, latency_batch=4)
    assert r.agreement == 1.0 and r.images == 10 and r.a.accuracy == r.b.accuracy
    assert set(fixed.seen) == {4}
    with pytest.raises(InputError, match="fixed batch size of 4: pass a latency batch of 4"):
        compare(_Fake(_by_mean), _Fake(_by_mean, batch=4), data)
    with pytest.raises(InputError, match="latency batch of 32 needs at least as many images"):
        compare(_Fake(_by_mean), _Fake(_by_mean), data, latency_batch=32)


def test_non_finite_or_misshapen_logits(models):
    data = open_source(DATA, models[2], limit=10)

    def nan(x):
        out = _by_mean(x)
        out[0, 3] = np.nan
        return out

    with pytest.raises(InputError, match="logits of B contain NaN or Inf"):
        compare(_Fake(_by_mean), _Fake(nan), data, latency_iters=0)
    with pytest.raises(InputError, match="B returned logits of shape"):
        compare(_Fake(_by_mean), _Fake(lambda x: _by_mean(x)[:, :7], classes="classes"), data, latency_iters=0)
    with pytest.raises(InputError, match="labels up to 9 but the models have 5 classes"):
        compare(_Fake(lambda x: _by_mean(x)[:, :5], classes=5), _Fake(lambda x: _by_mean(x)[:, :5], classes=5),
                open_source(DATA, models[2], limit=64), latency_iters=0)


def test_latency_ratio_is_the_median_of_paired_round_ratios():
    """Each round times A and B back to back; the ratio is the median of their per-round ratios, so a machine
    that drifts from a fast to a slow mode during the rounds does not move it."""
    from gprebn_edge.runtime.compare import _ratio

    drift = np.linspace(0.14, 0.24, 101)  # slows down by 70 % over the rounds
    jitter = 1 + 0.02 * np.sin(np.arange(101))
    out = _ratio(np.stack([drift, 1.1 * drift * jitter]), batch=1, warmup=0)
    assert out["ratio"] == pytest.approx(float(np.median(1.1 * jitter)))
    lo, hi = out["ratio_ci95"]
    assert lo <= out["ratio"] <= hi and hi - lo < 0.05 and "ratio_of_medians" in out


class _Clock:
    """A fake `time` for compare's latency rounds (bench.time_interleaved): each runner's infer advances it
    by its next scripted duration (ms), so the interleaved samples are known exactly."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        return self.t


def _timed(clock, durations_ms):
    todo = [0.0] + list(durations_ms)  # the accuracy pass's one call costs nothing

    def fn(x):
        clock.t += todo.pop(0) / 1e3
        return _by_mean(x)
    return fn


def test_table_p50s_and_ratio_line_cannot_contradict(models, monkeypatch):
    """Bimodal latencies (a busy CPU switching between a fast and a slow mode), the same mode for A and B in
    all but 3 rounds: the paired ratio is 1.00x while A's p50 falls in the fast mode and B's in the slow
    one (1.12x apart). The markdown must print both ratios, say which is which, and flag the gap."""
    from gprebn_edge.runtime import bench

    clock = _Clock()
    monkeypatch.setattr(bench, "time", clock)
    modes = [0.157] * 49 + [0.176] * 49
    a = modes[:49] + [0.157] * 3 + modes[49:]
    b = modes[:49] + [0.176] * 3 + modes[49:]
    data = open_source(DATA, models[2], limit=10)
    r = compare(_Fake(_timed(clock, a)), _Fake(_timed(clock, b)), data, batch=10, latency_iters=101,
                latency_warmup=0)
    assert r.a.latency_ms["p50"] == pytest.approx(0.157) and r.b.latency_ms["p50"] == pytest.approx(0.176)
    assert r.latency["ratio"] == pytest.approx(1.0)
    md = r.to_markdown()
    row = next(line for line in md.splitlines() if line.startswith("| latency p50"))
    p50_a, p50_b = (float(c) for c in row.strip("|").split("|")[1:])
    lo, hi = r.latency["ratio_ci95"]
    shown = p50_b / p50_a
    assert not lo <= shown <= hi  # the case the issue saw: the table alone suggests 12 % apart
    assert f"{shown:.3f}x" in md and f"{r.latency['ratio']:.3f}x" in md
    assert "ratio of the p50s" in md and "paired" in md and "101 interleaved rounds" in md
    assert "Note:" in md and "different latency modes" in md
    assert r.latency["ratio_of_medians_in_ci"] is False


def test_agreeing_ratios_carry_no_note(models, monkeypatch):
    from gprebn_edge.runtime import bench

    clock = _Clock()
    monkeypatch.setattr(bench, "time", clock)
    a = list(np.linspace(0.15, 0.2, 41))
    data = open_source(DATA, models[2], limit=10)
    r = compare(_Fake(_timed(clock, a)), _Fake(_timed(clock, [1.1 * v for v in a])), data, batch=10,
                latency_iters=41, latency_warmup=0)
    assert r.latency["ratio"] == pytest.approx(1.1) and r.latency["ratio_of_medians_in_ci"] is True
    assert "Note:" not in r.to_markdown()


def _captured(monkeypatch, module):
    figures = []
    monkeypatch.setattr(module, "save_figure", lambda fig, path: figures.append(fig))
    return figures


def _with_thin_bins(result) -> tuple[CompareResult, list[int]]:
    """The result with model A's reliability counts redrawn so that two non-empty bins hold fewer than
    MIN_BIN_COUNT images (the same total): (that result, the thin counts)."""
    from gprebn_edge.runtime import compare_plot

    d = result.to_dict()
    rel = d["models"][0]["reliability"]
    full = [i for i, acc in enumerate(rel["accuracy"]) if acc is not None]
    assert len(full) >= 3, "the fixture needs three non-empty bins"
    counts = [0] * len(rel["count"])
    thin = [3, compare_plot.MIN_BIN_COUNT - 1]
    counts[full[0]], counts[full[1]] = thin
    counts[full[2]] = result.images - sum(thin) - (len(full) - 3) * compare_plot.MIN_BIN_COUNT
    for i in full[3:]:
        counts[i] = compare_plot.MIN_BIN_COUNT
    rel["count"] = counts
    return CompareResult.from_dict(d), thin


def test_reliability_bins_carry_counts_and_the_plot_marks_thin_bins(result, monkeypatch):
    pytest.importorskip("matplotlib")
    from gprebn_edge.runtime import compare_plot

    for m in result.models:
        counts = m.reliability["count"]
        assert len(counts) == len(m.reliability["edges"]) - 1 and sum(counts) == result.images
    thinned, thin = _with_thin_bins(result)
    assert sum(thinned.a.reliability["count"]) == result.images
    figures = _captured(monkeypatch, compare_plot)
    plot_compare(thinned, "unused.png")
    ax = figures[0].axes[0]
    counts = thinned.a.reliability["count"]
    texts = {t.get_text() for t in ax.texts}
    assert {str(c) for c in counts if c > 0} <= texts  # every non-empty bin is labelled with its count
    greyed = [p for p in ax.patches if p.get_facecolor()[:3] == (0.75, 0.75, 0.75)]
    assert len(greyed) == len(thin)
    assert any(f"fewer than {compare_plot.MIN_BIN_COUNT}" in t.get_text() for t in ax.get_legend().get_texts())


def test_plot_titles_wrap_rather_than_cut(result, monkeypatch):
    pytest.importorskip("matplotlib")
    from gprebn_edge.runtime import compare_plot

    long_a, long_b = "unadapted-" + "x" * 20 + ".onnx", "adapted-after-a-long-run-" + "y" * 8 + ".onnx"
    d = result.to_dict()
    d["models"][0]["name"], d["models"][1]["name"] = long_a, long_b
    figures = _captured(monkeypatch, compare_plot)
    plot_compare(CompareResult.from_dict(d), "unused.png")
    fig = figures[0]
    titles = [fig._suptitle.get_text()] + [ax.get_title() for ax in fig.axes]
    assert "\n" in titles[0] and long_a in titles[0].replace("\n", " ") and long_b in titles[0].replace("\n", " ")
    for title in titles:
        assert all(len(line) <= compare_plot.TITLE_WIDTH for line in title.split("\n")), title
    latency = fig.axes[-1].get_title().replace("\n", " ")
    assert "paired" in latency and "p50" in latency
