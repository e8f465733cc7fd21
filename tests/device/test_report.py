"""loop-report on synthesized metrics logs: cut and corrupt lines, resumed runs, the served-only-passed
check, per-segment sums, latency percentiles and ratio from histograms, rotated logs, markdown and PNG."""

import json
import sys

import numpy as np
import pytest

from gprebn_edge.device.histogram import LAYOUT, MAX_RELATIVE_ERROR, LatencyHistogram
from gprebn_edge.device.report import format_summary, plot_loop, read_log, summarize, summary_to_json
from gprebn_edge.errors import ArtifactError, InputError, MissingDependencyError

PNG = b"\x89PNG\r\n\x1a\n"


def write_log(path, records, tail=""):
    """Records as JSON lines, then `tail` verbatim (e.g. a line cut by a kill)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return path


def window(frames, n=100, served=0, correct=None, labeled=0, segments=None, idle=(), adapting=(), entropy=1.0):
    """A window record as the loop writes it (latency histograms)."""
    lat = list(idle) + list(adapting) or [1.0]
    latencies = {"latency_hist_ms": {**LAYOUT, "idle": LatencyHistogram(idle).to_json(),
                                     "adapting": LatencyHistogram(adapting).to_json()}}
    return {"event": "window", "t": frames / 100, "frames": frames, "n": n, "served_round": served,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
                           "p99": float(np.percentile(lat, 99)), "mean": float(np.mean(lat))},
            "latency_idle_ms": None, "latency_adapting_ms": None, "adapting_fraction": 0.0,
            "mean_entropy": entropy, "labeled": labeled, "correct": correct, "by_segment": segments or {},
            **latencies}


def start(frames=0, rnd=0, resumed=False):
    return {"event": "start", "t": frames / 100, "resumed": resumed, "round": rnd, "frames": frames, "config": {}}


def round_(rnd, frames, passed, error=None):
    return {"event": "round", "t": frames / 100, "round": rnd, "frames": frames, "buffer": 64, "seconds": 0.5,
            "passed": passed, "reasons": [] if passed else ["mean_entropy 0.01 < 0.02"], "gates": {},
            "mean_entropy": 0.8, "stats_drift": 0.1 * rnd, "error": error}


def swap(rnd, frames):
    return {"event": "swap", "t": frames / 100, "round": rnd, "frames": frames}


def rollback(to, frames):
    return {"event": "rollback", "t": frames / 100, "to_round": to, "failures": 3, "frames": frames}


def stop(frames):
    return {"event": "stop", "t": frames / 100, "frames": frames, "reason": "end of stream"}


@pytest.fixture
def run(tmp_path):
    """A labeled run over two segments, killed once and resumed, with one rejected round, one worker error,
    two swaps and a rollback; the last line is cut by a second kill."""
    records = [
        start(),
        window(100, correct=50, labeled=100, segments={"clean#0": [50, 100]}, idle=[1.0, 2.0, 3.0]),
        round_(1, 150, passed=True), swap(1, 150),
        window(200, served=1, correct=70, labeled=100, segments={"clean#0": [30, 40], "fog-5#1": [40, 60]},
               adapting=[4.0, 6.0]),
        round_(2, 250, passed=False),
        window(300, served=1, correct=60, labeled=100, segments={"fog-5#1": [60, 100]}, idle=[5.0]),
        start(300, rnd=1, resumed=True),
        round_(3, 350, passed=False, error="RuntimeError: CUDA out of memory"),
        round_(3, 380, passed=True), swap(3, 390), rollback(1, 395),
        window(400, served=1, correct=80, labeled=100, segments={"fog-5#1": [80, 100]}, adapting=[8.0]),
        stop(400),
    ]
    return write_log(tmp_path / "loop.jsonl", records, tail='{"event": "window", "t": 4.1, "fra')


def test_summary_of_a_resumed_run(run):
    log = read_log(run)
    assert log.truncated_lines == (f"{run} line 15",) and len(log.records) == 14
    s = summarize(log)
    assert (s["frames"], s["frames_in_windows"], s["windows"]) == (400, 400, 4)
    assert (s["starts"], s["resumes"], s["stop_reason"], s["truncated_lines"]) == (2, 1, "end of stream", 1)
    # a worker error is not a rejected candidate: 4 rounds = 2 passed + 1 rejected + 1 error
    assert (s["rounds"], s["passed"], s["rejected"], s["errors"]) == (4, 2, 1, 1)
    assert s["triggers"] == {"cadence": 4, "shift": 0, "follow-up": 0}
    assert s["rejection_reasons"] == {"mean_entropy 0.01 < 0.02": 1}
    assert (s["swaps"], s["rollbacks"]) == (1 + 1, 1)
    assert s["wall_seconds"] == pytest.approx(4.0) and s["serving_seconds"] == pytest.approx(4.0)
    assert (s["correct"], s["labeled"], s["accuracy"]) == (260, 400, 0.65)
    assert [w["accuracy"] for w in s["accuracy_series"]] == [0.5, 0.7, 0.6, 0.8]
    # per segment: summed over windows, in order of first appearance
    assert s["segments"] == [{"name": "clean#0", "correct": 80, "labeled": 140, "accuracy": 80 / 140},
                             {"name": "fog-5#1", "correct": 180, "labeled": 260, "accuracy": 180 / 260}]
    # a round id re-run after the resume: the latest record (passed) is the one the swap refers to
    assert s["served_only_passed"] and s["violations"] == []
    assert [r["round"] for r in s["rejected_rounds"]] == [2, 3]
    assert s["stats_drift"] == pytest.approx({"mean": 0.225, "max": 0.3})


def test_latency_percentiles_and_ratio(run):
    lat = summarize(read_log(run))["latency_ms"]

    def close(x):
        return pytest.approx(x, rel=MAX_RELATIVE_ERROR)

    # idle [1, 2, 3, 5]: p50 2.5, p99 3 + 0.97 * 2; adapting [4, 6, 8]: p50 6, p99 6 + 0.98 * 2
    for got, want in ((lat["idle"], {"p50": 2.5, "p99": 4.94, "n": 4}),
                      (lat["adapting"], {"p50": 6.0, "p99": 7.96, "n": 3}),
                      (lat["all"], {"p50": 4.0, "p99": 7.94, "n": 7})):
        assert got["n"] == want["n"] and got["p50"] == close(want["p50"]) and got["p99"] == close(want["p99"])
    assert lat["ratio"]["p50"] == pytest.approx(6.0 / 2.5, rel=2.2 * MAX_RELATIVE_ERROR)
    assert lat["ratio"]["p99"] == pytest.approx(7.96 / 4.94, rel=2.2 * MAX_RELATIVE_ERROR)


def test_markdown_has_the_rows(run):
    md = format_summary(summarize(read_log(run)))
    for row in ("| frames served | 400 |", "| starts (resumed) | 2 (1) |", "| swaps | 2 |", "| rollbacks | 1 |",
                "| rejected candidates | 1 (mean_entropy 0.01 < 0.02 1) |", "| worker errors | 1 |",
                "| online accuracy | 65.0 % of 400 labeled |",
                "| served only candidates that passed | yes |", "| clean#0 | 140 | 80 | 57.1 % |",
                "| fog-5#1 | 260 | 180 | 69.2 % |", "| idle | 4 | ", "| running | 3 | ",
                "| ratio running / idle | | 2.",
                "From histograms: within 4.4 %.",
                "round 3 at frame 350: RuntimeError: CUDA out of memory", "| cut lines skipped | 1 |"):
        assert row in md, row
    assert "## Violations" not in md


def test_swap_of_a_failed_round_is_a_violation(tmp_path):
    path = write_log(tmp_path / "bad.jsonl", [
        start(), round_(1, 50, passed=True), round_(1, 60, passed=False),  # latest record of round 1 failed
        swap(1, 70), window(100, served=1), swap(9, 120), rollback(7, 130), window(200, served=5)])
    s = summarize(read_log(path))
    assert not s["served_only_passed"]
    assert len(s["violations"]) == 4
    assert "swap to round 1 at frame 70, which failed its gates (mean_entropy 0.01 < 0.02)" in s["violations"][0]
    assert "round 9" in s["violations"][1] and "no round record" in s["violations"][1]
    assert "rollback at frame 130 to round 7" in s["violations"][2]
    assert "served round 5" in s["violations"][3]
    md = format_summary(s)
    assert "**NO** (4 violations)" in md and "## Violations" in md


def test_without_labels_or_background_adaptation(tmp_path):
    path = write_log(tmp_path / "nolabels.jsonl", [start(), window(100, idle=[1.0, 3.0], entropy=0.5),
                                                   window(200, idle=[2.0], entropy=float("nan"))])
    log = read_log(path)
    s = summarize(log)
    assert s["accuracy"] is None and s["labeled"] == 0 and s["segments"] == []
    assert [w["accuracy"] for w in s["accuracy_series"]] == [None, None]
    assert s["mean_entropy"] == 0.5 and s["stop_reason"] is None  # killed: no stop record last
    assert s["latency_ms"]["adapting"] is None and s["latency_ms"]["ratio"] == {"p50": None, "p99": None}
    assert json.loads(summary_to_json(s))["latency_ms"]["idle"]["p50"] == pytest.approx(2.0, rel=MAX_RELATIVE_ERROR)
    md = format_summary(s)
    assert "| online accuracy | no labels |" in md and "| running | 0 | n/a | n/a |" in md
    assert plot_loop(log, tmp_path / "nolabels.png").read_bytes()[:8] == PNG


def test_summary_to_json_has_no_nan():
    text = summary_to_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": None}})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_corrupt_middle_line_names_it(tmp_path):
    path = tmp_path / "corrupt.jsonl"
    path.write_text(json.dumps(start()) + "\n" + '{"event": "wind\n' + json.dumps(window(100)) + "\n")
    with pytest.raises(ArtifactError, match="line 2: unparsable JSON"):
        read_log(path)
    # a resume appended to the cut line without a newline first: named as such
    path.write_text(json.dumps(start()) + "\n" + '{"event": "wind' + json.dumps(start(0, resumed=True)) + "\n"
                    + json.dumps(window(100)) + "\n")
    with pytest.raises(ArtifactError, match="line 2: .*appended to a line cut by a kill"):
        read_log(path)
    path.write_text(json.dumps(start()) + "\n" + json.dumps({"event": "swap", "t": 1.0}) + "\n")
    with pytest.raises(ArtifactError, match="line 2: the 'swap' record lacks a valid 'round'"):
        read_log(path)


def test_cut_line_before_a_resume_is_skipped(tmp_path):
    path = write_log(tmp_path / "resumed.jsonl", [start(), window(100)], tail='{"event": "win\n')
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(start(100, resumed=True)) + "\n" + json.dumps(window(200)) + "\n")
    log = read_log(path)
    assert log.truncated_lines == (f"{path} line 3",)
    assert [r["event"] for r in log.records] == ["start", "window", "start", "window"]


def test_missing_and_empty_logs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_log(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="is empty"):
        read_log(tmp_path / "empty.jsonl")
    (tmp_path / "cut.jsonl").write_text('{"event": "sta')
    with pytest.raises(InputError, match="no complete record"):
        read_log(tmp_path / "cut.jsonl")


def test_plot_is_a_png(run, tmp_path):
    out = plot_loop(read_log(run), tmp_path / "loop.png")
    data = out.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000
    with pytest.raises(InputError, match="no window record"):
        plot_loop(read_log(write_log(tmp_path / "w.jsonl", [start()])), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_without_matplotlib(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[plot\]"):
        plot_loop(read_log(run), tmp_path / "x.png")


def test_run_level_percentiles_merge_window_histograms(tmp_path):
    """40 windows of 250 frames written by Window: the run's p50/p99 idle and adapting are within 5 % of the
    exact ones over every frame, and the log holds no per-frame list."""
    from gprebn_edge.device.window import Window

    rng = np.random.default_rng(0)
    records, idle, adapting = [start()], [], []
    for k in range(40):
        w = Window()
        for f in range(250):
            busy = k % 2 == 1
            ms = float(rng.lognormal(np.log(3.0 if busy else 2.0), 0.3) if rng.random() > 0.01 else rng.uniform(5, 40))
            (adapting if busy else idle).append(ms)
            w.add(rng.normal(size=10).astype(np.float32), ms, busy, None, None, 250 * k + f)
        records.append({"event": "window", "t": k + 1.0, "frames": 250 * (k + 1), "served_round": 0, **w.record()})
    path = write_log(tmp_path / "metrics.jsonl", records)
    assert path.stat().st_size < 40 * 1500
    lat = summarize(read_log(path))["latency_ms"]
    for got, exact in ((lat["idle"], idle), (lat["adapting"], adapting), (lat["all"], idle + adapting)):
        assert got["n"] == len(exact)
        for q in (50, 99):
            assert got[f"p{q}"] == pytest.approx(np.percentile(exact, q), rel=0.05)


def test_a_malformed_histogram_is_named(tmp_path):
    rec = window(100)
    rec["latency_hist_ms"]["adapting"] = [[500, 1]]
    with pytest.raises(ArtifactError, match=r"line 2: \"latency_hist_ms.adapting\" must be \[bin, count\] pairs"):
        summarize(read_log(write_log(tmp_path / "a.jsonl", [start(), rec])))
    rec["latency_hist_ms"] = {**rec["latency_hist_ms"], "adapting": [], "per_octave": 4}
    with pytest.raises(ArtifactError, match=r"line 2: \"latency_hist_ms\" has the bin layout"):
        summarize(read_log(write_log(tmp_path / "b.jsonl", [start(), rec])))
    rec = window(100)
    rec["latency_hist_ms"] = [[1, 2]]
    with pytest.raises(ArtifactError, match=r"line 2: \"latency_hist_ms\" must be an object"):
        summarize(read_log(write_log(tmp_path / "c.jsonl", [start(), rec])))
