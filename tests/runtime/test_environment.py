"""describe_environment: every key, never an exception; the Jetson probes on faked files and commands."""

import platform
import subprocess
from pathlib import Path

import numpy as np

from gprebn_edge.runtime import environment
from gprebn_edge.runtime.base import RunnerInfo
from gprebn_edge.runtime.environment import describe_environment, jetson_info

KEYS = {"host", "os", "machine", "cpu", "cpu_count", "cpu_affinity", "python", "versions", "gpu", "jetson"}


def test_describes_this_machine():
    env = describe_environment(RunnerInfo("onnxruntime", "cpu", details={"threads": 2}))
    assert KEYS | {"runner"} == set(env)
    assert env["cpu_count"] >= 1 and env["python"] == platform.python_version()
    assert env["versions"]["numpy"] == np.__version__
    assert env["versions"]["gprebn_edge"] and "tensorrt" in env["versions"]
    assert env["runner"] == {"backend": "onnxruntime", "device": "cpu", "precision": "fp32",
                             "details": {"threads": 2}}
    if not Path("/etc/nv_tegra_release").exists():
        assert env["jetson"] is None
    assert set(describe_environment()) == KEYS


def test_a_failing_probe_gives_none(monkeypatch):
    def broken():
        raise RuntimeError("no")

    monkeypatch.setattr(platform, "node", broken)
    monkeypatch.setattr(environment, "library_versions", broken)
    env = describe_environment()
    assert env["host"] is None and env["versions"] is None and env["python"]


def test_jetson_power_mode_and_clocks(monkeypatch, tmp_path):
    gpu = tmp_path / "17000000.ga10b" / "devfreq" / "17000000.ga10b"
    gpu.mkdir(parents=True)
    (gpu / "cur_freq").write_text("918000000\n")
    files = {"/etc/nv_tegra_release": "# R36 (release), REVISION: 3.0, GCID: 36191598\nmore",
             "/proc/device-tree/model": "NVIDIA Jetson AGX Orin Developer Kit\x00"}
    real_read = environment._read
    monkeypatch.setattr(environment, "_read", lambda p: files[p].replace("\x00", "").strip() if p in files
                        else real_read(p))
    monkeypatch.setattr(environment, "_GPU_FREQ_GLOBS", (str(tmp_path / "*.ga10b/devfreq/*/cur_freq"),))
    monkeypatch.setattr(environment, "_EMC_FREQ_FILES", (str(tmp_path / "unreadable"),))
    monkeypatch.setattr(environment.shutil, "which", lambda name: "/usr/sbin/nvpmodel" if name == "nvpmodel" else None)
    monkeypatch.setattr(environment.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a[0], 0, stdout="NV Power Mode: MAXN\n0\n", stderr=""))
    info = jetson_info()
    assert info == {"l4t": "# R36 (release), REVISION: 3.0, GCID: 36191598",
                    "board": "NVIDIA Jetson AGX Orin Developer Kit", "power_mode": {"name": "MAXN", "id": 0},
                    "gpu_freq_hz": 918000000, "emc_freq_hz": None}

    def timeout(*a, **k):
        raise subprocess.TimeoutExpired(a[0], 5)

    monkeypatch.setattr(environment.subprocess, "run", timeout)
    assert jetson_info()["power_mode"] is None
