"""One PNG for a comparison: reliability diagrams of both models (with labels), accuracy (or, without
labels, mean confidence) and latency bars. matplotlib is imported here, on first use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gprebn_edge.optional import new_figure, save_figure
from gprebn_edge.runtime.compare import CompareResult, ModelReport

__all__ = ["plot_compare"]

_COLORS = ("tab:blue", "tab:orange")


def plot_compare(result: CompareResult, path: str | Path) -> None:
    """Write the comparison's figure to `path` as PNG, atomically."""
    panels: list[tuple[str, int]] = []
    if result.has_labels and all(m.reliability is not None for m in result.models):
        panels += [("reliability", 0), ("reliability", 1)]
    panels.append(("accuracy" if result.has_labels else "confidence", -1))
    if result.latency is not None:
        panels.append(("latency", -1))
    fig = new_figure((4.2 * len(panels), 4.0))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (kind, k) in zip(axes[0], panels, strict=True):
        if kind == "reliability":
            _reliability(ax, result.models[k], _COLORS[k])
        elif kind == "latency":
            _latency(ax, result)
        else:
            _quality(ax, result, kind)
    fig.suptitle(f"{result.a.name} vs {result.b.name}: {result.images} images, agreement "
                 f"{100 * result.agreement:.1f} %")
    fig.tight_layout()
    save_figure(fig, path)


def _reliability(ax: Any, m: ModelReport, color: str) -> None:
    rel = m.reliability
    assert rel is not None
    edges = rel["edges"]
    width = edges[1] - edges[0]
    centers = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    full = [i for i, acc in enumerate(rel["accuracy"]) if acc is not None]
    ax.bar([centers[i] for i in full], [rel["accuracy"][i] for i in full], width=width * 0.95, color=color,
           edgecolor="black", linewidth=0.5, label="accuracy")
    ax.bar([centers[i] for i in full], [rel["confidence"][i] - rel["accuracy"][i] for i in full],
           bottom=[rel["accuracy"][i] for i in full], width=width * 0.95, color="none", edgecolor="red",
           hatch="//", linewidth=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ece = "" if m.ece is None else f", ECE {m.ece:.3f}"
    ax.set_title(f"{m.name}: reliability{ece}")
    ax.legend(loc="upper left", fontsize=8)


def _quality(ax: Any, result: CompareResult, kind: str) -> None:
    values = [(m.accuracy if kind == "accuracy" else m.mean_confidence) or 0.0 for m in result.models]
    names = [m.name for m in result.models]
    bars = ax.bar(names, [100 * v for v in values], color=_COLORS)
    ax.bar_label(bars, labels=[f"{100 * v:.1f} %" for v in values])
    ax.set_ylim(0, 105)
    ax.set_ylabel("top-1 accuracy (%)" if kind == "accuracy" else "mean confidence (%)")
    ax.set_title("accuracy" if kind == "accuracy" else "mean confidence (no labels)")


def _latency(ax: Any, result: CompareResult) -> None:
    lat = result.latency
    assert lat is not None
    p50 = [m.latency_ms["p50"] if m.latency_ms else 0.0 for m in result.models]
    p90 = [m.latency_ms["p90"] if m.latency_ms else 0.0 for m in result.models]
    bars = ax.bar([m.name for m in result.models], p50, color=_COLORS,
                  yerr=[[0.0, 0.0], [hi - mid for hi, mid in zip(p90, p50, strict=True)]], capsize=6)
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in p50], label_type="center")
    ax.set_ylabel(f"latency (ms, batch {lat['batch']}): p50, bar to p90")
    lo, hi = lat["ratio_ci95"]
    ax.set_title(f"latency {result.b.name} / {result.a.name}:\n{lat['ratio']:.2f}x (95 % CI {lo:.2f}-{hi:.2f})")
