"""Latency plot of one or more benchmark runs: a histogram and the per-iteration time series, as PNG. Runs
whose latencies differ by more than LOG_SPAN times (batch 1 beside batch 32) share log axes, so neither is
squashed to a sliver. matplotlib is imported when plotting, never at import."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from gprebn_edge.errors import InputError
from gprebn_edge.optional import new_figure, save_figure
from gprebn_edge.runtime.bench import BenchResult
from gprebn_edge.runtime.metrics import latency_summary
from gprebn_edge.runtime.tables import wrap_title

__all__ = ["plot_latency", "LOG_SPAN", "TITLE_WIDTH"]

LOG_SPAN = 5.0     # above this ratio of the slowest to the fastest typical latency, the axes go logarithmic
TITLE_WIDTH = 90   # characters per line of the figure's title (11 inches wide)

Result: TypeAlias = BenchResult | Mapping[str, Any]


def _series(result: Result) -> tuple[str, np.ndarray]:
    if isinstance(result, BenchResult):
        return result.label(), np.asarray(result.latencies_ms, dtype=np.float64)
    latencies = np.asarray(result.get("latencies_ms") or [], dtype=np.float64)
    r = result.get("runner") or {}
    label = f"{r.get('backend', 'run')} {r.get('device', '')} {r.get('precision', '')}".split()
    return " ".join(label + ([f"b{result['batch']}"] if "batch" in result else [])), latencies


def plot_latency(results: Result | Sequence[Result], path: str | Path, *, labels: Sequence[str] | None = None,
                 title: str | None = None) -> Path:
    """Write a PNG with the latency histogram (left) and latency per iteration (right) of each result
    (BenchResult or its to_dict()), with p50 and p99 marked. Written atomically."""
    items: list[Result] = [results] if isinstance(results, BenchResult | Mapping) else list(results)
    series = [_series(r) for r in items]
    if not series or any(len(lat) == 0 for _, lat in series):
        raise InputError("nothing to plot: every result needs per-iteration latencies")
    if labels is not None:
        if len(labels) != len(series):
            raise InputError(f"{len(labels)} labels for {len(series)} results")
        series = [(label, lat) for label, (_, lat) in zip(labels, series, strict=True)]

    fig = new_figure((11.0, 4.0))
    fig.set_layout_engine("constrained")
    hist_ax, time_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    everything = np.concatenate([lat for _, lat in series])
    lo, hi = np.percentile(everything, [0, 99.5])  # keep rare outliers from squashing the histogram
    log = lo > 0 and hi / lo > LOG_SPAN
    bins = np.geomspace(lo, hi, 60) if log else np.linspace(lo, hi if hi > lo else lo + 1e-3, 60)
    for i, (label, lat) in enumerate(series):
        color = f"C{i % 10}"
        s = latency_summary(lat, (50, 99))
        hist_ax.hist(np.clip(lat, bins[0], bins[-1]), bins=bins, alpha=0.55, color=color,
                     label=f"{label}: p50 {s['p50']:.3f}, p99 {s['p99']:.3f} ms")
        hist_ax.axvline(s["p50"], color=color, linestyle="-", linewidth=1)
        hist_ax.axvline(s["p99"], color=color, linestyle="--", linewidth=1)
        time_ax.plot(np.arange(1, len(lat) + 1), lat, color=color, linewidth=0.8, label=label)
        time_ax.axhline(s["p50"], color=color, linestyle=":", linewidth=1)
    if log:
        hist_ax.set_xscale("log")
        time_ax.set_yscale("log")
    hist_ax.set_xlabel("latency (ms" + (", log scale)" if log else ")"))
    hist_ax.set_ylabel("iterations")
    hist_ax.set_title("distribution (solid p50, dashed p99)")
    hist_ax.legend(fontsize="small")
    time_ax.set_xlabel("iteration")
    time_ax.set_ylabel("latency (ms" + (", log scale)" if log else ")"))
    time_ax.set_title("per iteration (dotted p50)")
    if title:
        fig.suptitle(wrap_title(title, TITLE_WIDTH))

    return save_figure(fig, path)
