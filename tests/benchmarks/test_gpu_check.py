"""benchmarks/gpu_check.py's CPU dry run (the script's logic where no GPU exists): every section runs or says
why not, the figures are finite and sane, a stop keeps partial results, a short budget skips sections, and
the package imports from the working tree without an install. The dry run's markdown is printed into the
test log (CI's output)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ["install", "gpu_tests", "parity", "adapt", "latency", "step", "tensorrt", "step_compiled"]


def _run(out: Path, *extra: str, timeout: float = 150) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc, json.loads((out / "gpu_check.json").read_text())


def _tensorrt_importable() -> bool:
    try:
        import tensorrt
    except Exception:
        return False
    return hasattr(tensorrt, "Runtime")


def _finite(*values: object) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    start = time.perf_counter()
    proc, data = _run(out)
    return proc, data, out, time.perf_counter() - start


def test_dry_run_covers_every_section(dry_run, capsys):
    proc, data, out, wall = dry_run
    with capsys.disabled():  # the dry run's tables in CI's log
        print(f"\n--- gpu_check --device cpu --quick: {wall:.1f} s wall, exit {proc.returncode} ---")
        print((out / "gpu_check.md").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(data["sections"]) == SECTIONS
    status = {name: s["status"] for name, s in data["sections"].items()}
    assert status == {**dict.fromkeys(SECTIONS, "ok"),
                      "tensorrt": "ok" if _tensorrt_importable() else "not available"}, status
    assert data["exit_status"] == 0 and data["seconds"] < data["budget_s"] + 20
    assert "[" in proc.stdout and "parity: start" in proc.stdout  # progress as it goes
    md = (out / "gpu_check.md").read_text()
    assert "| section | status | seconds | note |" in md and "## latency: ok" in md


def test_dry_run_figures(dry_run):
    _, data, _, _ = dry_run
    sec = data["sections"]
    modules = {r["module"]: r["version"] for r in sec["install"]["rows"]}
    assert all(modules[m] != "missing" for m in ("torch", "numpy", "onnx", "onnxruntime", "safetensors"))
    assert sec["gpu_tests"]["rows"][0]["collected"] >= 1

    parity = {r["mode"]: r for r in sec["parity"]["rows"] if r["model"] == "builtin"}
    assert set(parity) == {"fp32", "fp16"}
    assert parity["fp32"]["top1_agreement"] == 1.0 and _finite(parity["fp32"]["max_rel_error"])
    assert parity["fp32"]["max_rel_error"] <= 1e-4 and parity["fp16"]["top1_agreement"] >= 0.97
    assert 0 < parity["fp16"]["max_rel_error"] <= 0.05  # really ran in half precision

    cpu, device = sec["adapt"]["rows"]
    for r in (cpu, device):
        assert _finite(r["error_adapted"], r["error_unadapted"]) and r["error_adapted"] < r["error_unadapted"] - 0.2
    cmp = sec["adapt"]["comparison"]
    assert abs(cmp["error_difference"]) <= cmp["tolerance"] and cmp["prediction_agreement"] >= 0.9

    lat = sec["latency"]["rows"]
    timed = {(r["mode"], r["batch"]) for r in lat if "p50_ms" in r}
    assert timed == {(m, b) for m in ("eager fp32 unfolded", "eager fp32") for b in (1, 4)}
    assert all(_finite(r["p50_ms"], r["images_per_s"]) and r["p50_ms"] > 0 for r in lat if "p50_ms" in r)
    ratios = [r for r in lat if "ratio" in r]
    assert [r["batch"] for r in ratios] == [1, 4]
    assert all(_finite(r["ratio"]) and 0.2 < r["ratio"] < 5 for r in ratios)  # identical graphs: ~1 on a calm CPU

    for name in ("step", "step_compiled"):
        (row,) = sec[name]["rows"]
        assert _finite(row["gprebn_over_tent"], row["gprebn_over_eval"], row["eval_ms"]) and row["eval_ms"] > 0
    # compiled: no recompile on every step (GpreBN's step counter is made a symbolic int), so GpreBN stays
    # within a small factor of Tent instead of 60x
    compiled = sec["step_compiled"]["rows"][0]
    assert compiled["graphs"] is None or compiled["graphs"] <= 6
    assert compiled["gprebn_over_tent"] < 5


def test_stop_keeps_partial_results(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # stop it while the GPU tests run, after install has finished
            try:
                if json.loads((out / "gpu_check.json").read_text())["sections"].get("gpu_tests", {}).get("status") \
                        == "running":
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    data = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 143, output[-2000:]
    assert data["sections"]["install"]["status"] == "ok"
    assert data["sections"]["gpu_tests"]["status"] == "stopped" and data["exit_status"] == 143
    assert "partial results kept" in output


def test_short_budget_skips_the_rest(tmp_path):
    proc, data = _run(tmp_path, "--sections", "install,parity", "--budget", "1", timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:]
    sec = data["sections"]
    assert sec["install"]["status"] == "ok"
    assert sec["parity"]["status"] == "skipped" and sec["parity"]["reason"].startswith("skipped: time budget")
    assert sec["adapt"]["reason"] == "skipped: not in --sections"


def test_unknown_section_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sections", "parity,bogus", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown sections ['bogus']" in proc.stderr


def test_sections_are_modules_that_load_the_package_late():
    """gpu_check.py parses and runs; each section is a module of benchmarks/gpu_sections/ (the package's
    list of them imports nothing of gprebn_edge, so the tree can be mapped first)."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import gpu_sections; "
            "assert not [m for m in sys.modules if m.startswith('gprebn_edge')], 'imported too early'; "
            "import gpu_check; gpu_check.use_tree(); print(','.join(n for n, fn in gpu_sections.sections() "
            "if fn.__module__.startswith('gpu_sections.')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().split(",") == SECTIONS


def test_package_imports_from_the_tree_without_install():
    """What the GPU machine does when nothing is installed: gpu_check maps export/ and runtime/ itself."""
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import gpu_check; print(gpu_check.use_tree()); "
            "import gprebn_edge.runtime.bench, gprebn_edge.export.tensorrt_build as t; print(t.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    how, where = proc.stdout.strip().splitlines()
    assert "not installed" in how and Path(where) == ROOT / "export" / "tensorrt_build.py"
