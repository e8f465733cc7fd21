"""plot_latency writes a real PNG atomically, from results or their JSON, and names the extra without
matplotlib."""

import json
import sys

import numpy as np
import pytest

from gprebn_edge.errors import InputError, MissingDependencyError
from gprebn_edge.runtime.bench import BenchResult, latency_stats
from gprebn_edge.runtime.latency_plot import plot_latency

PNG = b"\x89PNG\r\n\x1a\n"


def fake_result(seed: int, backend: str) -> BenchResult:
    lat = list(np.random.default_rng(seed).gamma(20, 0.05, size=300))
    return BenchResult(batch=1, input_shape=[1, 3, 32, 32], iterations=300, warmup_iterations=10, first_call_ms=9.0,
                       first_call_cold=True, activate_ms=20.0, latencies_ms=lat, stats=latency_stats(lat),
                       throughput=1e3, cv=0.2, warnings=[], peak_host_memory_mb=None, peak_device_memory_mb=None,
                       runner={"backend": backend, "device": "cpu", "precision": "fp32", "details": {}})


def test_png_of_one_and_of_several(tmp_path):
    one = plot_latency(fake_result(0, "onnxruntime"), tmp_path / "one.png")
    data = one.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000
    two = plot_latency([fake_result(0, "onnxruntime"), json.loads(json.dumps(fake_result(1, "torch").to_dict()))],
                       tmp_path / "two.png", labels=["A", "B"], title="A vs B")
    assert two.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png"]


def test_bad_requests(tmp_path):
    with pytest.raises(InputError, match="labels"):
        plot_latency(fake_result(0, "x"), tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(InputError, match="nothing to plot"):
        plot_latency({"latencies_ms": []}, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[plot\]"):
        plot_latency(fake_result(0, "x"), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_batch_1_and_batch_32_do_not_share_a_linear_axis(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from gprebn_edge.runtime import latency_plot

    figures = []
    monkeypatch.setattr(latency_plot, "save_figure", lambda fig, path: figures.append(fig) or path)
    slow = fake_result(1, "onnxruntime").to_dict()
    slow["batch"], slow["latencies_ms"] = 32, [30 * v for v in slow["latencies_ms"]]
    plot_latency([fake_result(0, "onnxruntime"), slow], tmp_path / "x.png", title="t " * 80)
    hist_ax, time_ax = figures[0].axes
    assert hist_ax.get_xscale() == "log" and time_ax.get_yscale() == "log"
    assert all(len(line) <= latency_plot.TITLE_WIDTH for line in figures[0]._suptitle.get_text().split("\n"))
    figures.clear()
    plot_latency([fake_result(0, "onnxruntime"), fake_result(1, "torch")], tmp_path / "y.png")
    assert figures[0].axes[0].get_xscale() == "linear"  # one scale of latencies: a linear axis reads best
