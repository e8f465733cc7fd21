"""progress.py: plain progress lines that a redirected log keeps."""

import io

from gprebn_edge.progress import ProgressLine, format_seconds, progress_lines


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_line_every_interval_with_rate_and_eta():
    clock, log = Clock(), io.StringIO()
    p = ProgressLine("adapting (gprebn)", 400, every=5.0, stream=log, clock=clock)
    clock.t = 2.0
    p.update(40)
    assert log.getvalue() == ""  # nothing within the first interval
    clock.t = 5.0
    p.update(100)
    clock.t = 6.0
    p.update(120)
    clock.t = 10.0
    p.update(200)
    p.close()
    assert log.getvalue().splitlines() == [
        "adapting (gprebn): 100/400 images, 20.0 images/s, ETA 15 s",
        "adapting (gprebn): 200/400 images, 20.0 images/s, ETA 10 s",
        "adapting (gprebn): 200/400 images, 20.0 images/s, done in 10 s",
    ]


def test_quick_work_prints_nothing_and_unknown_totals_have_no_eta():
    clock, log = Clock(), io.StringIO()
    with ProgressLine("parity check", stream=log, clock=clock) as p:
        p.update(64)
    assert log.getvalue() == ""
    p = ProgressLine("parity check", stream=log, clock=clock, every=1.0)
    clock.t = 2.0
    p.update(128)
    assert log.getvalue() == "parity check: 128 images, 64.0 images/s\n"


def test_stages_close_each_other():
    log = io.StringIO()
    report = progress_lines(every=0.0, stream=log)
    report("adapting (tent)", 10, 20)
    report("adapting (tent)", 20, 20)
    report("refreshing statistics", 20, 20)
    lines = log.getvalue().splitlines()
    # a finished stage prints its final line once, not a progress line as well
    assert [line.split(":")[0] for line in lines] == ["adapting (tent)", "adapting (tent)", "refreshing statistics"]
    assert "ETA" in lines[0] and "done in" in lines[1] and "done in" in lines[2]


def test_format_seconds():
    assert [format_seconds(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]
