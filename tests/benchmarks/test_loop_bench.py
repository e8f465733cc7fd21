"""benchmarks/loop_streams.py: its accounting on made-up log records, and a tiny run of its offline baselines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import loop_streams  # noqa: E402


def _window(end: int, n: int, correct: int) -> dict:
    return {"event": "window", "frames": end, "n": n, "labeled": n, "correct": correct}


def test_second_half_counts_only_whole_windows_of_each_second_half():
    windows = [_window(50, 50, 10), _window(100, 50, 40), _window(150, 50, 50), _window(200, 50, 25)]
    out = loop_streams.second_half_accuracy(windows, [("a#0", 0, 100), ("b#1", 100, 200)])
    assert out["a#0"] == {"accuracy": 0.8, "labeled": 50}
    assert out["b#1"] == {"accuracy": 0.5, "labeled": 50}
    straddling = loop_streams.second_half_accuracy([_window(120, 100, 100)], [("a#0", 0, 100)])
    assert straddling["a#0"] == {"accuracy": None, "labeled": 0}


def test_round_stats_count_as_loop_report_does(tmp_path):
    """Counts come from device/report.summarize (one reading of the log); the benchmark adds the timeline."""
    from gprebn_edge.device.metrics_log import read_log

    records = [
        {"event": "start", "round": 0, "frames": 0},
        {"event": "round", "round": 1, "frames": 500, "trigger": "cadence", "outcome": "passed", "passed": True,
         "reasons": []},
        {"event": "swap", "round": 1, "frames": 520},
        {"event": "shift", "frames": 1040, "reason": "entropy 0.9 sigma"},
        {"event": "round", "round": 2, "frames": 1100, "trigger": "shift: entropy", "outcome": "rejected",
         "passed": False, "reasons": ["agreement: top-1 agreement 0.1 (floors: 0.5)", "mean_entropy: 0.001 < 0.02"]},
        {"event": "round", "round": 3, "frames": 1600, "trigger": "cadence", "outcome": "rejected", "passed": False,
         "reasons": ["diverged: adaptation diverged (non-finite)"]},
        {"event": "round", "round": 4, "frames": 2100, "trigger": "cadence", "outcome": "error", "passed": False,
         "error": "boom"},
        {"event": "rollback", "frames": 2200, "to_round": 1},
        {"event": "stop", "frames": 2300, "reason": "end"},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"t": float(i), **r}) + "\n" for i, r in enumerate(records)))
    s = loop_streams.round_stats(read_log(path))
    assert s["rounds"] == 4 and s["triggers"] == {"cadence": 3, "shift": 1, "follow-up": 0}
    assert s["passed"] == 1 and s["rejected"] == 2 and s["errors"] == 1 and s["error_messages"] == ["boom"]
    assert s["rejection_reasons"] == {"agreement": 1, "mean_entropy": 1, "diverged": 1}
    assert s["swaps"] == 1 and s["swapped_at"] == [520] and s["rollbacks"] == 1
    assert s["shift_detections"] == [{"frames": 1040, "reason": "entropy 0.9 sigma"}]
    assert [r["round"] for r in s["timeline"]] == [1, 2, 3, 4]


def test_segment_rows_mark_each_criterion():
    run = {"second_half": {"a": {"accuracy": 0.90}, "b": {"accuracy": 0.50}, "c": {"accuracy": None}}}
    acc = lambda x: {"accuracy": x}  # noqa: E731
    base = {"a": {"unadapted": acc(0.905), "once_adapted": acc(0.92)},
            "b": {"unadapted": acc(0.40), "once_adapted": acc(0.60)},
            "c": {"unadapted": acc(0.40), "once_adapted": acc(0.60)}}
    rows, lines = loop_streams.segment_rows(run, base)
    assert [(r["pass_once"], r["pass_unadapted"]) for r in rows] == [(True, True), (False, True), (False, False)]
    assert "pass |" in lines[2] and "FAIL" in lines[3] and "n/a" in lines[4]


@pytest.mark.parametrize("frames", [32])
def test_collapse_segments_and_baselines_run(tmp_path, frames):
    segments = loop_streams.collapse_segments(frames)
    assert [s[0] for s in segments] == ["clean#0", f"exposure-{loop_streams.EXPOSURE:g}#1",
                                        f"stripes-{loop_streams.STRIPES:g}#2", "clean#3"]
    dark, striped = segments[1][1], segments[2][1]
    assert dark.dtype == np.float32 and dark.max() <= loop_streams.EXPOSURE + 1e-6 and dark.shape == (frames, 32, 32, 3)
    assert striped.min() >= 0.0 and striped.max() <= 1.0 + 1e-6
    assert (striped[:, :, 2::4] >= loop_streams.STRIPES - 1e-6).all()  # columns 2-3 of every 4 lifted
    assert (striped[:, :, 3::4] >= loop_streams.STRIPES - 1e-6).all()
    npz = loop_streams.write_npz(segments, tmp_path / "c.npz")
    with np.load(npz) as f:
        assert f["images"].shape[0] == 4 * frames and f["labels"].shape == (4 * frames,)
    out = loop_streams.baselines(segments)
    for name in ("clean#0", segments[1][0]):
        for key in ("unadapted", "once_adapted"):
            assert 0.0 <= out[name][key]["accuracy"] <= 1.0
    assert out["clean#0"]["unadapted"]["accuracy"] > 0.8
    for segment in segments[1:3]:  # the unadapted model puts nearly every frame in one class
        assert loop_streams.collapse_evidence(segment)["unadapted"]["top_share"] >= 0.9, segment[0]
