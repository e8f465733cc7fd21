"""One PNG for a comparison: reliability diagrams of both models (with labels; each bin labelled with its
number of images, bins of fewer than MIN_BIN_COUNT grey), accuracy (or, without labels, mean confidence) and
latency bars under a title with both the paired ratio and the ratio of the p50s. Titles wrap, never cut.
matplotlib is imported here, on first use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gprebn_edge.optional import new_figure, save_figure
from gprebn_edge.runtime.compare import CompareResult, ModelReport
from gprebn_edge.runtime.tables import wrap_title

__all__ = ["plot_compare", "MIN_BIN_COUNT", "TITLE_WIDTH"]

_COLORS = ("tab:blue", "tab:orange")
MIN_BIN_COUNT = 10  # a bin's accuracy over fewer images is mostly noise: drawn grey
TITLE_WIDTH = 40    # characters per title line: about what a 4.2-inch panel holds at the default size


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
    fig.suptitle(wrap_title(f"{result.a.name} vs {result.b.name}: {result.images} images, agreement "
                            f"{100 * result.agreement:.1f} %", TITLE_WIDTH))
    fig.tight_layout()
    save_figure(fig, path)


def _reliability(ax: Any, m: ModelReport, color: str) -> None:
    rel = m.reliability
    assert rel is not None
    edges, counts = rel["edges"], rel["count"]
    width = (edges[1] - edges[0]) * 0.95
    centers = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    full = [i for i, acc in enumerate(rel["accuracy"]) if acc is not None]
    thin = [i for i in full if counts[i] < MIN_BIN_COUNT]
    for group, face, label in ((sorted(set(full) - set(thin)), color, "accuracy"),
                               (thin, "0.75", f"fewer than {MIN_BIN_COUNT} images")):
        if group:
            ax.bar([centers[i] for i in group], [rel["accuracy"][i] for i in group], width=width, color=face,
                   edgecolor="black", linewidth=0.5, label=label)
    ax.bar([centers[i] for i in full], [rel["confidence"][i] - rel["accuracy"][i] for i in full],
           bottom=[rel["accuracy"][i] for i in full], width=width, color="none", edgecolor="red",
           hatch="//", linewidth=0.5, label="gap to confidence")
    for i in full:  # the number of images behind each bar, just above it
        ax.text(centers[i], min(max(rel["accuracy"][i], rel["confidence"][i]) + 0.01, 0.97), str(counts[i]),
                ha="center", va="bottom", fontsize=6, color="0.4" if counts[i] < MIN_BIN_COUNT else "black")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (numbers: images per bin)")
    ax.set_ylabel("accuracy")
    ece = "" if m.ece is None else f", ECE {m.ece:.3f}"
    ax.set_title(wrap_title(f"{m.name}: reliability{ece}", TITLE_WIDTH))
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
    ax.set_ylabel(f"latency (ms, batch {lat['batch']}): p50, bar to p90,\nover the same {lat['rounds']} "
                  "interleaved rounds")
    lo, hi = lat["ratio_ci95"]
    title = (f"latency {result.b.name} / {result.a.name}: paired {lat['ratio']:.2f}x (95 % CI {lo:.2f}-{hi:.2f}); "
             f"ratio of the p50s {lat['ratio_of_medians']:.2f}x")
    if not lat.get("ratio_of_medians_in_ci", True):
        title += " (the p50s fall in different latency modes: trust the paired ratio)"
    ax.set_title(wrap_title(title, TITLE_WIDTH), fontsize=10)
