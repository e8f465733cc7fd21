"""Section `gpu_tests`: the test files marked gpu or trt, run by pytest in a child process."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

from gpu_sections.harness import Check

ROOT = Path(__file__).resolve().parents[2]


def run(c: Check) -> None:
    """pytest -m "gpu or trt" in a child process (from the tree, as this script imports the package), on the
    test files that use those marks: collecting the others would import what only they need (typer,
    matplotlib, ...), which a GPU image may lack. The dry run only collects them: on a CPU they all skip,
    and their fixtures would cost the CI more than the rest of the dry run."""
    if importlib.util.find_spec("pytest") is None:
        c.fail("pytest is not installed: the GPU tests cannot run (docs/gpu.md: carry it)")
        return
    paths = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if re.search(r"mark\.(gpu|trt)\b", p.read_text(encoding="utf-8")))
    args = ["-m", "gpu or trt", "-q", "-rfEs", "-p", "no:cacheprovider", *(["--collect-only"] if c.quick else []),
            *paths]
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import gpu_check; gpu_check.use_tree(); "
            f"import pytest; sys.exit(pytest.main({args!r}))")
    c.say(f"  pytest {' '.join(shlex.quote(a) for a in args)}")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, c.left()))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        c.fail(f"pytest did not finish in its {c.entry['budget_s']} s")
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = out.strip().splitlines()
    summary = re.sub(r"(\d+)/\d+ tests collected", r"\1 collected", lines[-1] if lines else "")
    counts = {k.rstrip("s"): int(n) for n, k in re.findall(
        r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|collected)", summary)}
    c.entry["output_tail"] = lines[-30:]
    keys = ("collected", "deselected") if c.quick else ("passed", "failed", "skipped", "error", "deselected")
    c.row(exit=proc.returncode, **{k: counts.get(k, 0) for k in keys})
    for line in lines:
        if line.startswith(("FAILED", "ERROR", "SKIPPED")):
            c.note(line[:240])
    if proc.returncode not in (0, None):
        c.fail(f"pytest exit status {proc.returncode} ({lines[-1][:160] if lines else 'no output'})")
    if c.cuda and counts.get("passed", 0) == 0:
        c.fail("no GPU test passed on a CUDA machine")
    if c.quick and counts.get("collected", 0) == 0:
        c.fail("no test is marked gpu or trt")


