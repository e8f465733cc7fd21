"""`loop-report`: read the device loop's JSON-lines metrics log (its rotated parts too, see `metrics_log`),
summarize a run (resumed ones included), check that only candidates that passed their gates were ever
served, and plot it. numpy only; matplotlib is imported when plotting.

Run-level latency percentiles merge the windows' latency histograms (within 4.4 %, see `histogram`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gprebn_edge.device.histogram import MAX_RELATIVE_ERROR, LatencyHistogram, check_layout
from gprebn_edge.device.metrics_log import LoopLog, read_log
from gprebn_edge.errors import ArtifactError, InputError
from gprebn_edge.io import strict_json
from gprebn_edge.optional import new_figure, save_figure
from gprebn_edge.runtime.tables import fmt_ms, fmt_pct, fmt_ratio, md_escape, md_table

__all__ = ["LoopLog", "read_log", "summarize", "summary_to_json", "format_summary", "plot_loop"]


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _percentiles(h: LatencyHistogram) -> dict[str, Any] | None:
    if not h.n:
        return None
    return {"p50": h.percentile(50), "p99": h.percentile(99), "n": h.n}


def _ratio(num: dict[str, Any] | None, den: dict[str, Any] | None, key: str) -> float | None:
    if num is None or den is None or not den[key] > 0:
        return None
    return float(num[key] / den[key])


def _histograms(log: LoopLog, i: int) -> tuple[LatencyHistogram, LatencyHistogram]:
    """(idle, adapting) latencies of window record i (none where it records none)."""
    w, where = log.records[i], log.where[i]
    hist = w.get("latency_hist_ms")
    if hist is None:
        return LatencyHistogram(), LatencyHistogram()
    field = f"{where}: \"latency_hist_ms\""
    if not isinstance(hist, dict):
        raise ArtifactError(f"{field} must be an object (the window's latency histograms)")
    check_layout({k: v for k, v in hist.items() if k not in ("idle", "adapting")}, field)
    return (LatencyHistogram.from_json(hist.get("idle", []), f"{where}: \"latency_hist_ms.idle\""),
            LatencyHistogram.from_json(hist.get("adapting", []), f"{where}: \"latency_hist_ms.adapting\""))


def _served_only_passed(records: Iterable[dict[str, Any]], complete: bool = True) -> list[str]:
    """Violations of "the loop never serves a candidate that failed its gates", in log order. Where rotation
    dropped the log's first parts (`complete` false), a round the kept parts do not introduce may have been
    started there: only rounds whose kept records show a failure are flagged."""
    latest: dict[int, dict[str, Any]] = {}  # round id -> its latest round record so far
    servable: set[int] = set()              # rounds started, swapped in or rolled back to so far
    fallen_back: set[int] = set()           # rounds a fallback handed back to serving (the start)
    violations = []

    def failed(r: int) -> bool:
        return r in latest and (not latest[r]["passed"] or latest[r].get("error") is not None)

    def unknown(r: int) -> bool:  # never introduced, and that is a violation
        return r not in servable and (complete or failed(r))

    for rec in records:
        ev = rec["event"]
        if ev == "round":
            latest[rec["round"]] = rec
        elif ev == "start":
            servable.add(rec["round"])
            if failed(rec["round"]):
                violations.append(f"start at frame {rec['frames']} serves round {rec['round']}, which failed "
                                  f"its gates")
        elif ev == "swap":
            r = rec["round"]
            if r not in latest and r not in fallen_back and complete:
                violations.append(f"swap to round {r} at frame {rec['frames']}: no round record before it")
            elif failed(r):
                why = latest[r].get("error") or "; ".join(latest[r].get("reasons") or []) or "passed=false"
                violations.append(f"swap to round {r} at frame {rec['frames']}, which failed its gates ({why})")
            servable.add(r)  # flagged once here, not again for every window that serves it
        elif ev in ("rollback", "fallback"):
            if unknown(rec["to_round"]):
                violations.append(f"{ev} at frame {rec['frames']} to round {rec['to_round']}, which was "
                                  f"never in service")
            servable.add(rec["to_round"])
            if ev == "fallback":
                fallen_back.add(rec["to_round"])
        elif ev == "window" and unknown(rec["served_round"]):
            violations.append(f"window ending at frame {rec['frames']} served round {rec['served_round']}, "
                              f"which was never started, swapped in or rolled back to")
            servable.add(rec["served_round"])
    return violations


def _accuracy(correct: int, labeled: int) -> float | None:
    return correct / labeled if labeled > 0 else None


def _serving_seconds(records: list[dict[str, Any]]) -> float:
    """Each session runs from its start record to the last record before the next start."""
    sessions: list[list[float]] = []
    for r in records:
        if r["event"] == "start" or not sessions:
            sessions.append([r["t"], r["t"]])
        sessions[-1][1] = r["t"]
    return float(sum(end - begin for begin, end in sessions))


def _windows(log: LoopLog) -> dict[str, Any]:
    """Sums over the window records: accuracy (overall, per segment, per window), entropy, latency."""
    labeled = correct = 0
    segments: dict[str, list[int]] = {}
    series = []
    idle, adapting = LatencyHistogram(), LatencyHistogram()
    entropy_sum = entropy_n = 0.0
    for i, w in enumerate(log.records):
        if w["event"] != "window":
            continue
        acc = None
        if w.get("correct") is not None and w.get("labeled"):
            labeled += int(w["labeled"])
            correct += int(w["correct"])
            acc = _accuracy(int(w["correct"]), int(w["labeled"]))
        for name, pair in (w.get("by_segment") or {}).items():
            total = segments.setdefault(name, [0, 0])  # dicts keep the order of first appearance
            total[0] += int(pair[0])
            total[1] += int(pair[1])
        if _is_number(w.get("mean_entropy")) and math.isfinite(w["mean_entropy"]) and w["n"] > 0:
            entropy_sum += w["mean_entropy"] * w["n"]
            entropy_n += w["n"]
        h_idle, h_adapting = _histograms(log, i)
        idle.merge(h_idle)
        adapting.merge(h_adapting)
        series.append({"frames": int(w["frames"]), "n": int(w["n"]), "accuracy": acc,
                       "served_round": int(w["served_round"])})
    lat_idle, lat_adapting = _percentiles(idle), _percentiles(adapting)
    return {
        "frames_in_windows": sum(s["n"] for s in series), "windows": len(series),
        "labeled": labeled, "correct": correct, "accuracy": _accuracy(correct, labeled),
        "segments": [{"name": name, "correct": c, "labeled": n, "accuracy": _accuracy(c, n)}
                     for name, (c, n) in segments.items()],
        "accuracy_series": series,
        "mean_entropy": entropy_sum / entropy_n if entropy_n else None,
        "latency_ms": {
            "all": _percentiles(LatencyHistogram().merge(idle).merge(adapting)), "idle": lat_idle,
            "adapting": lat_adapting,
            "ratio": {"p50": _ratio(lat_adapting, lat_idle, "p50"), "p99": _ratio(lat_adapting, lat_idle, "p99")},
            "max_relative_error": MAX_RELATIVE_ERROR,
        },
    }


def _triggers(rounds: list[dict[str, Any]]) -> dict[str, int]:
    """Rounds by why they started: "cadence" (--every/--interval), "shift" (the shift detector) or "follow-up"
    (on more frames of a detected shift's new domain); a log written before rounds recorded it counts as
    cadence."""
    out = {"cadence": 0, "shift": 0, "follow-up": 0}
    for r in rounds:
        trigger = str(r.get("trigger") or "")
        out[next((k for k in ("shift", "follow-up") if trigger.startswith(k)), "cadence")] += 1
    return out


def _rejection_reasons(rejected: list[dict[str, Any]]) -> dict[str, int]:
    """Rejected candidates by failed check (the text before the first colon of each reason)."""
    out: dict[str, int] = {}
    for r in rejected:
        for reason in r.get("reasons") or ["failed"]:
            key = str(reason).split(":", 1)[0]
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def summarize(log: LoopLog) -> dict[str, Any]:
    """Totals, online accuracy (overall, per segment, per window), latency idle vs adapting and the
    served-only-passed check of one run (of the parts rotation kept). Plain JSON types; None where a value
    does not exist."""
    recs = log.records
    rounds = log.events("round")
    starts = log.events("start")
    stops = log.events("stop")
    errors = [r for r in rounds if r.get("error") is not None]
    rejected = [r for r in rounds if not r["passed"] and r.get("error") is None]
    drift = [float(r["stats_drift"]) for r in rounds if _is_number(r.get("stats_drift"))]
    violations = _served_only_passed(recs, complete=not log.dropped_parts)
    with_frames = [r for r in recs if "frames" in r]
    windows = _windows(log)
    publishes = log.events("publish")
    return {
        "log": str(log.path),
        "log_parts": len(log.parts),
        "dropped_parts": log.dropped_parts,
        "truncated_lines": len(log.truncated_lines),
        "frames": int(with_frames[-1]["frames"]) if with_frames else 0,
        "frames_in_windows": windows.pop("frames_in_windows"),
        "windows": windows.pop("windows"),
        "wall_seconds": float(recs[-1]["t"] - recs[0]["t"]),
        "serving_seconds": _serving_seconds(recs),
        "starts": len(starts),
        "resumes": sum(bool(s.get("resumed")) for s in starts),
        "stop_reason": stops[-1].get("reason") if stops and recs[-1]["event"] == "stop" else None,
        "rounds": len(rounds),
        "passed": len(rounds) - len(rejected) - len(errors),
        "rejected": len(rejected),
        "errors": len(errors),
        "triggers": _triggers(rounds),
        "rejection_reasons": _rejection_reasons(rejected),
        "swaps": len(log.events("swap")),
        "rollbacks": len(log.events("rollback")),
        "fallbacks": len(log.events("fallback")),
        **windows,
        "stats_drift": {"mean": float(np.mean(drift)), "max": float(np.max(drift))} if drift else None,
        "rejected_rounds": [{"round": r["round"], "frames": r["frames"], "error": r.get("error"),
                             "reasons": list(r.get("reasons") or [])} for r in rejected + errors],
        "served_only_passed": not violations,
        "violations": violations,
        "published": [{"round": p["round"], "version": p.get("version")} for p in publishes if p.get("ok")],
        "publish_failures": [{"round": p["round"], "error": str(p.get("error"))} for p in publishes
                             if not p.get("ok")],
    }


def summary_to_json(summary: Mapping[str, Any]) -> str:
    """The summary as strict JSON: NaN and infinities (a log may carry them) become null."""
    return strict_json(summary, indent=2)


def format_summary(summary: Mapping[str, Any], max_listed: int = 10) -> str:
    """Markdown: totals, accuracy per segment, serving latency idle vs adapting, and any violations."""
    s = summary
    ok = "yes" if s["served_only_passed"] else f"**NO** ({len(s['violations'])} violations)"
    totals = [
        ("frames served", f"{s['frames']}"),
        ("wall time", f"{s['wall_seconds']:.1f} s (serving {s['serving_seconds']:.1f} s)"),
        ("starts (resumed)", f"{s['starts']} ({s['resumes']})"),
        ("adaptation rounds", f"{s['rounds']} ({s['triggers']['shift']} started by a shift, "
                              f"{s['triggers']['follow-up']} following one up, {s['triggers']['cadence']} on the "
                              "cadence)"),
        ("passed gates", f"{s['passed']}"),
        ("rejected candidates", f"{s['rejected']}" + (" (" + ", ".join(
            f"{k} {v}" for k, v in s["rejection_reasons"].items()) + ")" if s["rejection_reasons"] else "")),
        ("worker errors", f"{s['errors']}"),
        ("swaps", f"{s['swaps']}"),
        ("rollbacks", f"{s['rollbacks']}"),
        ("fallbacks to the start model", f"{s.get('fallbacks', 0)}"),
        ("online accuracy", f"{fmt_pct(s['accuracy'], 1)} of {s['labeled']} labeled" if s["labeled"] else "no labels"),
        ("served only candidates that passed", ok),
    ]
    if s["published"] or s["publish_failures"]:
        totals.append(("published versions (failed)", f"{len(s['published'])} ({len(s['publish_failures'])})"))
    if s["truncated_lines"]:
        totals.append(("cut lines skipped", f"{s['truncated_lines']}"))
    if s["dropped_parts"]:
        totals.append(("log parts dropped by rotation", f"{s['dropped_parts']} (the figures cover the "
                                                         f"{s['log_parts']} kept)"))
    out = [f"# Loop run: {md_escape(s['log'])}", "", *md_table(["", ""], totals, align="ll")]
    if s["segments"]:
        out += ["", "## Online accuracy per segment", ""]
        out += md_table(["segment", "labeled", "correct", "accuracy"],
                        [(g["name"], g["labeled"], g["correct"], fmt_pct(g["accuracy"], 1)) for g in s["segments"]])
    lat = s["latency_ms"]
    out += ["", "## Serving latency (ms)", "", f"From histograms: within {100 * lat['max_relative_error']:.1f} %.",
            ""]
    rows: list[tuple[object, ...]] = [
        (label, 0 if p is None else p["n"], fmt_ms(p and p["p50"]), fmt_ms(p and p["p99"]))
        for label, p in (("any", lat["all"]), ("idle", lat["idle"]), ("running", lat["adapting"]))]
    rows.append(("ratio running / idle", "", fmt_ratio(lat["ratio"]["p50"], 2), fmt_ratio(lat["ratio"]["p99"], 2)))
    out += md_table(["adaptation in background", "frames", "p50", "p99"], rows)
    for title, items in (("Violations", s["violations"]),
                         ("Publish failures", [f"round {p['round']}: {p['error']}" for p in s["publish_failures"]]),
                         ("Rejected candidates", [f"round {r['round']} at frame {r['frames']}: "
                                                  f"{r['error'] or '; '.join(r['reasons']) or 'failed'}"
                                                  for r in s["rejected_rounds"]])):
        if items:
            out += ["", f"## {title}", ""] + [f"- {v}" for v in items[:max_listed]]
            if len(items) > max_listed:
                out.append(f"- ... and {len(items) - max_listed} more")
    return "\n".join(out) + "\n"


def _segment_spans(windows: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Frames each segment covers: exact where windows record `segment_frames`, else the windows' extents."""
    spans: dict[str, tuple[int, int]] = {}
    for w in windows:
        exact = w.get("segment_frames") or {}
        for name in w.get("by_segment") or {}:
            lo, hi = exact.get(name) or (int(w["frames"]) - int(w["n"]), int(w["frames"]))
            a, b = spans.get(name, (lo, hi))
            spans[name] = (min(a, lo), max(b, hi))
    return spans


def plot_loop(log: LoopLog, path: str | Path) -> Path:
    """PNG of a run: accuracy per window (mean entropy without labels) with segments shaded, swaps (green),
    rejected candidates (red x) and rollbacks (orange) marked; window latency p50/p99 below. Atomic."""
    windows = log.events("window")
    if not windows:
        raise InputError(f"nothing to plot: {log.path} has no window record (the loop served no full window)")
    x = np.array([w["frames"] for w in windows], dtype=np.float64)
    acc = [w["correct"] / w["labeled"] if w.get("correct") is not None and w.get("labeled") else np.nan
           for w in windows]
    labeled = not np.isnan(acc).all()

    def number(w: dict[str, Any], *keys: str) -> float:
        v: Any = w
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return float(v) if _is_number(v) else np.nan

    fig = new_figure((11.0, 6.5))
    fig.set_layout_engine("constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1.6, 1]})
    for k, (name, (lo, hi)) in enumerate(_segment_spans(windows).items()):
        top.axvspan(lo, hi, color=f"C{k % 10}", alpha=0.12, linewidth=0)
        top.text((lo + hi) / 2, 1.01, name, transform=top.get_xaxis_transform(), ha="center", va="bottom",
                 fontsize=7, clip_on=False)
    if labeled:
        top.plot(x, 100 * np.asarray(acc), "-o", color="tab:blue", markersize=2.5, linewidth=1, label="accuracy")
        top.set_ylabel("online accuracy (%)")
    else:
        top.plot(x, [number(w, "mean_entropy") for w in windows], "-o", color="tab:purple", markersize=2.5,
                 linewidth=1, label="mean entropy")
        top.set_ylabel("mean entropy (nats, no labels)")
    for event, color, style in (("swap", "tab:green", "-"), ("rollback", "tab:orange", "--")):
        for i, r in enumerate(log.events(event)):
            for ax in (top, bottom):
                ax.axvline(r["frames"], color=color, linestyle=style, linewidth=1,
                           label=f"{event}" if i == 0 and ax is top else None)
    rejected = [r for r in log.events("round") if not r["passed"] or r.get("error") is not None]
    if rejected:
        top.plot([r["frames"] for r in rejected], [0.96] * len(rejected), "x", color="tab:red",
                 transform=top.get_xaxis_transform(), markersize=7, label="rejected candidate")
    for s in log.events("start"):
        if s.get("resumed"):
            top.axvline(s["frames"], color="black", linestyle=":", linewidth=1)
    top.legend(fontsize="small", loc="lower left")
    bottom.plot(x, [number(w, "latency_ms", "p50") for w in windows], color="tab:blue", linewidth=1, label="p50")
    bottom.plot(x, [number(w, "latency_ms", "p99") for w in windows], color="tab:red", linewidth=1, label="p99")
    bottom.set_xlabel("frames served")
    bottom.set_ylabel("window latency (ms)")
    bottom.legend(fontsize="small", loc="upper left")
    fig.suptitle(f"loop run {log.path.name}: {int(x[-1])} frames, {len(log.events('swap'))} swaps, "
                 f"{len(rejected)} rejected, {len(log.events('rollback'))} rollbacks")
    return save_figure(fig, path)
