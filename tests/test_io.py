"""gprebn_edge.io: importing it leaves the process umask alone; new files get 0666 less the umask."""

import os
import subprocess
import sys
import textwrap

from gprebn_edge import io


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_import_does_not_touch_the_umask():
    out = _run("""
        import os
        calls = []
        real = os.umask
        os.umask = lambda m: calls.append(m) or real(m)
        import gprebn_edge.io
        print(calls)
    """)
    assert out == "[]"


def test_new_files_get_the_current_umask(tmp_path):
    out = _run(f"""
        import os, stat
        from gprebn_edge.io import write_text_atomic
        os.umask(0o027)
        write_text_atomic({str(tmp_path / 'a.txt')!r}, "x")
        print(oct(stat.S_IMODE(os.stat({str(tmp_path / 'a.txt')!r}).st_mode)), oct(os.umask(0o027)))
    """)
    assert out == "0o640 0o27"


def test_umask_read_from_proc_matches_and_changes_nothing():
    before = os.umask(0o022)
    os.umask(before)
    assert io.current_umask() == before
    after = os.umask(before)
    os.umask(after)
    assert after == before


def test_fallback_without_proc_sets_and_restores_once(monkeypatch, tmp_path):
    monkeypatch.setattr(io, "_PROC_STATUS", str(tmp_path / "no_proc_status"))
    monkeypatch.setattr(io, "_fallback_umask", None)
    calls = []
    real = os.umask
    monkeypatch.setattr(io.os, "umask", lambda m: calls.append(m) or real(m))
    before = real(0o022)
    real(before)
    assert io.current_umask() == before and io.current_umask() == before
    assert len(calls) == 2  # read once (set, then put back), then cached
    now = real(before)
    real(now)
    assert now == before
