"""Ctrl-C and SIGTERM stop every command cleanly (issue 10): exit 130 / 143, exactly one line on stderr, no
traceback, no abort, and no half-written output (no *.tmp left; the output is absent or its previous content).
Each command runs for real in a subprocess on small built-in data; SIGINT and SIGTERM go to two runs side by
side. Strict JSON: no file the tool writes holds a bare NaN or Infinity. `demo --out` says it replaced a report.

The signal lands once the child's handlers are in place (read from /proc: `main` installs them first thing)
plus a delay chosen so that the command is in its work: adapting, checking parity, timing, comparing, the
demo's first shift. `info` and `loop-report` finish within about a second of that, so theirs is sent at once,
which lands while they import and load (there is nothing later to interrupt)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from signal_wait import wait_for_handlers
from typer.testing import CliRunner

from gprebn_edge.adaptation import AdaptConfig, adapt_to_file

CLI = [sys.executable, "-c", "from gprebn_edge.cli import main; main()"]
PREVIOUS = b"previous content\n"
TIMEOUT = 60  # seconds a child may take to stop; more is a hang


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    from gprebn_edge.device.loop import LoopConfig, run_loop
    from gprebn_edge.export.pipeline import export_artifact

    root = tmp_path_factory.mktemp("signals")
    ckpt = root / "a.safetensors"
    adapt_to_file("builtin:small_resnet", "synthetic:clean:n=64", ckpt, AdaptConfig(batch_size=32))
    export_artifact(ckpt, root / "a.onnx", check_images=64)
    result = run_loop(LoopConfig(state=root / "state", source="stream:clean*60,gaussian_noise-5*60", model=ckpt,
                                 every=60, buffer=64, min_frames=48, window=50, max_frames=120))
    return {"ckpt": ckpt, "onnx": root / "a.onnx", "log": Path(result.log)}


def _command(name: str, made: dict[str, Path], folder: Path) -> tuple[list[str], Path | None, float]:
    """The command line, the output file it would write, and the delay after the handlers are in place."""
    ckpt, onnx = str(made["ckpt"]), str(made["onnx"])
    if name == "adapt":
        out = folder / "out.safetensors"
        return ["adapt", "--model", "builtin:small_resnet", "--data", "synthetic:fog:5:n=20000", "-o",
                str(out)], out, 1.5
    if name == "export":
        out = folder / "out.onnx"
        return ["export", ckpt, "--onnx", str(out), "--data", "synthetic:fog:5:n=20000", "--check-images",
                "20000"], out, 1.5
    if name == "bench":
        out = folder / "out.json"
        return ["bench", onnx, "--duration", "30", "--json", str(out)], out, 1.5
    if name == "compare":
        out = folder / "out.json"
        return ["compare", onnx, onnx, "--data", "synthetic:fog:5:n=20000", "--json", str(out)], out, 1.5
    if name == "demo":
        out = folder / "demo" / "report.json"
        return ["demo", "--quick", "--shifts", "fog", "--out", str(folder / "demo")], out, 2.0
    if name == "loop-report":
        out = folder / "out.json"
        return ["loop-report", str(made["log"]), "--json", str(out), "--plot", str(folder / "out.png")], out, 0.0
    assert name == "info"
    return ["info", ckpt], None, 0.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc")
@pytest.mark.parametrize("name", ["adapt", "export", "bench", "compare", "demo", "loop-report", "info"])
def test_sigint_and_sigterm_stop_cleanly(tmp_path, made, name):
    runs = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        folder = tmp_path / sig.name
        folder.mkdir()
        cmd, out, delay = _command(name, made, folder)
        if out is not None and sig == signal.SIGTERM:  # this run must leave a previous output as it was
            out.parent.mkdir(exist_ok=True)
            out.write_bytes(PREVIOUS)
        child = subprocess.Popen([*CLI, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=folder)
        runs.append((sig, folder, out, delay, child))
    try:
        deadline = time.monotonic() + TIMEOUT
        for _, _, _, _, child in runs:
            wait_for_handlers(child, deadline)
        start = time.monotonic()
        for sig, _, _, delay, child in runs:
            time.sleep(max(0.0, start + delay - time.monotonic()))
            assert child.poll() is None, (name, sig.name, "finished before the signal", child.communicate())
            child.send_signal(sig)
        results = [(sig, folder, out, *child.communicate(timeout=TIMEOUT), child.returncode)
                   for sig, folder, out, _, child in runs]
    finally:
        for *_, child in runs:
            if child.poll() is None:
                child.kill()
                child.communicate()
    for sig, folder, out, _stdout, err, code in results:
        lines = [line for line in err.splitlines() if line.strip()]
        print(name, sig.name, code, lines)
        assert code == 128 + sig, (name, sig.name, code, err)
        assert len(lines) == 1, (name, sig.name, err)
        assert lines[0].startswith("interrupted:" if sig == signal.SIGINT else "terminated:"), (name, err)
        assert "Traceback" not in err and "terminate called" not in err
        assert not list(folder.rglob("*.tmp")), (name, sig.name, list(folder.rglob("*.tmp")))
        if out is not None:
            assert not out.exists() if sig == signal.SIGINT else out.read_bytes() == PREVIOUS, (name, sig.name)


# -- strict JSON ----------------------------------------------------------------------------------------------
def _strict(path: Path) -> object:
    def refuse(token: str) -> float:
        raise AssertionError(f"{path} holds a bare {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("module", ["bench", "compare"])
def test_write_json_is_strict(tmp_path, module):
    import importlib

    write_json = importlib.import_module(f"gprebn_edge.runtime.{module}").write_json
    payload = {"p50": math.nan, "rows": [1.0, math.inf, -math.inf], "ok": 2.5}
    write_json(SimpleNamespace(to_dict=lambda: payload), tmp_path / "r.json")
    assert _strict(tmp_path / "r.json") == {"p50": None, "rows": [1.0, None, None], "ok": 2.5}


def _fake_demo(monkeypatch) -> None:
    import gprebn_edge.demo as demo

    row = {"domain": "fog-5", "folder": "x", "source_error": 0.5, "adapted_error": math.nan, "agreement": 0.9,
           "source_ece": math.inf, "adapted_ece": 0.1, "online_error": None, "health": "ok",
           "latency_ratio": 1.0, "latency_ratio_ci95": [0.9, 1.1], "parity_max_rel": 1e-6, "parity_top1": 1.0,
           "parity_images": 8}
    bench = {"model_folder": "x", "plot": "p.png", "environment": {}, "rows": [
        {"batch": 1, "unadapted_p50_ms": 1.0, "adapted_p50_ms": math.nan, "unadapted_p99_ms": 1.0,
         "adapted_p99_ms": 1.0, "ratio_p50": math.nan, "warnings": []}]}
    monkeypatch.setattr(demo, "_domain", lambda *a, **k: dict(row))
    monkeypatch.setattr(demo, "_bench", lambda *a, **k: bench)
    monkeypatch.setattr(demo, "_errors_plot", lambda *a, **k: None)
    monkeypatch.setattr(demo, "_tensorrt_status", lambda: "not here")


def test_demo_report_is_strict_json(tmp_path, monkeypatch):
    from gprebn_edge.demo import run_demo

    _fake_demo(monkeypatch)
    run_demo(tmp_path / "d", quick=True, domains=("fog",))
    report = _strict(tmp_path / "d" / "report.json")
    assert isinstance(report, dict)
    assert report["rows"][0]["adapted_error"] is None and report["rows"][0]["source_ece"] is None
    assert report["bench"]["rows"][0]["ratio_p50"] is None


def test_demo_says_it_replaced_a_previous_report(tmp_path, monkeypatch):
    from gprebn_edge.cli import app

    _fake_demo(monkeypatch)
    runner = CliRunner()
    out = tmp_path / "d"
    first = runner.invoke(app, ["demo", "--quick", "--shifts", "fog", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "replaced" not in first.stderr
    second = runner.invoke(app, ["demo", "--quick", "--shifts", "fog", "--out", str(out)])
    assert second.exit_code == 0, second.output
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"replaced the previous report in {out}"), second.stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc")
def test_signals_while_stopping_are_ignored(tmp_path, made):
    """Ctrl-C, then more signals while the command stops and exits: still exit 130 and one line (the later
    ones neither cut the clean-up into a traceback nor kill the process at interpreter exit)."""
    cmd, out, delay = _command("adapt", made, tmp_path)
    child = subprocess.Popen([*CLI, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + TIMEOUT
        wait_for_handlers(child, deadline)
        time.sleep(delay)
        assert child.poll() is None, child.communicate()
        child.send_signal(signal.SIGINT)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
            time.sleep(0.02)
            if child.poll() is None:
                child.send_signal(sig)
        _, err = child.communicate(timeout=TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    lines = [line for line in err.splitlines() if line.strip()]
    assert child.returncode == 130 and lines == ["interrupted: nothing was written"], (child.returncode, err)
    assert out is not None and not out.exists() and not list(tmp_path.rglob("*.tmp"))


def test_an_error_caused_by_the_stop_signal_is_reported_as_the_stop(monkeypatch, capsys):
    """A signal inside a C extension's import surfaces as an ImportError, and from there as the project's
    error ("onnxruntime is not installed"): once a stop signal arrived, the stop is what is reported."""
    import typer

    from gprebn_edge.cli import _app
    from gprebn_edge.errors import MissingDependencyError

    monkeypatch.setattr(_app._signals, "signum", signal.SIGTERM)
    monkeypatch.setattr(_app._signals, "reported", False)
    with pytest.raises(typer.Exit) as stopped, _app.cli_errors():
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime")
    assert stopped.value.exit_code == 143
    err = capsys.readouterr().err
    assert "terminated: nothing was written" in err and "not installed" not in err
    monkeypatch.setattr(_app._signals, "signum", None)
    with pytest.raises(typer.Exit) as failed, _app.cli_errors():
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime")
    assert failed.value.exit_code == 1 and "not installed" in capsys.readouterr().err
