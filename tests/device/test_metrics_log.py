"""The metrics log: one fsynced JSON line per record, shared between threads, a line cut by a kill, and
size-based rotation (bounded bytes on disk, every part read back in order, dropped parts reported)."""

import json
import threading

import pytest

from gprebn_edge.device.metrics_log import MetricsLog, log_parts, read_log, rotated_path
from gprebn_edge.device.report import format_summary, summarize


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_write_returns_the_record_and_close_ignores_late_writes(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    rec = log.write("start", round=0, frames=0)
    assert rec["event"] == "start" and rec["round"] == 0 and isinstance(rec["t"], float)
    log.close()
    assert log.write("stop", frames=1)["event"] == "stop"  # a worker finishing after the stop: no error
    log.close()
    assert [r["event"] for r in lines(tmp_path / "metrics.jsonl")] == ["start"]


def test_a_cut_last_line_is_followed_by_a_fresh_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"event": "start", "t": 1.0, "round": 0, "frames": 0}) + '\n{"event": "win')
    log = MetricsLog(path)
    log.write("start", round=0, frames=0, resumed=True)
    log.close()
    parsed = read_log(path)
    assert [r["event"] for r in parsed.records] == ["start", "start"] and len(parsed.truncated_lines) == 1


def test_a_failed_write_is_reported_and_dropped(tmp_path):
    errors = []
    log = MetricsLog(tmp_path / "metrics.jsonl", on_error=errors.append)
    log._file.close()  # the next write fails like a full disk would
    log._file = open(tmp_path / "metrics.jsonl", encoding="utf-8")  # read-only: write raises OSError
    log.write("stop", frames=1)
    assert len(errors) == 1 and isinstance(errors[0], OSError)
    log.close()


def test_rotation_bounds_the_bytes_and_keeps_every_kept_record_in_order(tmp_path):
    path, max_bytes, keep = tmp_path / "metrics.jsonl", 4096, 2
    log = MetricsLog(path, max_bytes=max_bytes, keep=keep)
    log.write("start", round=0, frames=0)
    for k in range(1, 2001):
        log.write("window", frames=k, n=1, served_round=0, pad="x" * 40)
        total = sum(p.stat().st_size for p in log_parts(path))
        assert total <= (keep + 1) * max_bytes
    log.close()
    parts = log_parts(path)
    assert parts == [rotated_path(path, 2), rotated_path(path, 1), path]
    assert all(p.stat().st_size <= max_bytes for p in parts)
    assert not list(tmp_path.glob(".*.tmp"))
    parsed = read_log(path)
    frames = [r["frames"] for r in parsed.records if r["event"] == "window"]
    assert frames == list(range(frames[0], 2001))  # oldest first, nothing missing in between
    continued = [r for r in parsed.records if r["event"] == "log_continued"]
    assert [r["part"] for r in continued] == list(range(parsed.dropped_parts, parsed.dropped_parts + 3))
    assert parsed.records[0]["event"] == "log_continued" and parsed.dropped_parts > 2
    s = summarize(parsed)
    assert (s["log_parts"], s["dropped_parts"], s["frames"]) == (3, parsed.dropped_parts, 2000)
    # the round served was started in a dropped part: not a violation
    assert s["served_only_passed"], s["violations"]
    assert f"| log parts dropped by rotation | {parsed.dropped_parts} (the figures cover the 3 kept) |" in (
        format_summary(s))


def test_a_reopened_log_keeps_rotating_and_numbering(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for _ in range(3):  # a resumed run opens the same log again
        log = MetricsLog(path, max_bytes=1000, keep=1)
        for k in range(30):
            log.write("window", frames=k, n=1, served_round=0)
        log.close()
    parsed = read_log(path)
    parts = [r["part"] for r in parsed.records if r["event"] == "log_continued"]
    assert parts == [parsed.dropped_parts, parsed.dropped_parts + 1] and len(log_parts(path)) == 2


def test_a_kill_between_the_renames_loses_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, max_bytes=600, keep=2)
    for k in range(20):
        log.write("window", frames=k, n=1, served_round=0)
    log.close()
    rotated_path(path, 1).replace(rotated_path(path, 2))  # killed after the renames, before the new file
    path.replace(rotated_path(path, 1))
    log = MetricsLog(path, max_bytes=600, keep=2)  # starts the new file as a continuation
    log.write("stop", frames=20)
    log.close()
    first = lines(path)[0]
    assert first["event"] == "log_continued" and first["part"] == lines(rotated_path(path, 1))[0]["part"] + 1
    parsed = read_log(path)
    frames = [r["frames"] for r in parsed.records if r["event"] == "window"]
    assert frames == list(range(frames[0], 20)) and parsed.records[-1]["event"] == "stop"


def test_threads_share_a_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, max_bytes=2000, keep=50)

    def writer(name):
        for k in range(100):
            log.write("note", who=name, k=k)

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    records = [r for r in read_log(path).records if r["event"] == "note"]
    assert len(records) == 400
    for i in range(4):
        assert [r["k"] for r in records if r["who"] == f"w{i}"] == list(range(100))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_bytes"):
        MetricsLog(tmp_path / "m.jsonl", max_bytes=0)
