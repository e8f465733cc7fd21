"""Where a measurement was taken: host, CPU, library versions, GPU and, on a Jetson, the L4T release, power
mode and clocks. Every probe is best effort: what cannot be read is None, and nothing here raises."""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from gprebn_edge import __version__
from gprebn_edge.runtime.base import RunnerInfo

__all__ = ["describe_environment", "library_versions", "cpu_model", "jetson_info", "memory_available",
           "resident_memory", "peak_resident_memory"]

# distribution names that provide each module (the first one installed wins)
_DISTRIBUTIONS = {
    "numpy": ("numpy",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml"),
    "onnx": ("onnx",),
    "torch": ("torch",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-lean", "tensorrt-dispatch"),
    "cuda-python": ("cuda-python", "cuda-bindings"),
}
_GPU_FREQ_GLOBS = ("/sys/devices/gpu.0/devfreq/*/cur_freq", "/sys/devices/platform/gpu.0/devfreq/*/cur_freq",
                   "/sys/devices/platform/*.ga10b/devfreq/*/cur_freq", "/sys/devices/*.gv11b/devfreq/*/cur_freq",
                   "/sys/devices/platform/*.gv11b/devfreq/*/cur_freq", "/sys/devices/*.gp10b/devfreq/*/cur_freq")
_EMC_FREQ_FILES = ("/sys/kernel/debug/bpmp/debug/clk/emc/rate", "/sys/kernel/debug/clk/emc/clk_rate",
                   "/sys/devices/platform/bus@0/13600000.emc/devfreq/13600000.emc/cur_freq")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").replace("\x00", "").strip() or None
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def memory_available() -> int | None:
    """Bytes of memory this machine can still give a process (Linux: MemAvailable; elsewhere the physical
    memory), or None where neither can be read."""
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _statm_resident() -> int | None:
    fields = (_read("/proc/self/statm") or "").split()
    try:
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (IndexError, ValueError, OSError, AttributeError):
        return None


def _maxrss() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def resident_memory() -> int | None:
    """This process's resident set size now, in bytes (Linux /proc; elsewhere its peak so far)."""
    now = _statm_resident()
    return now if now is not None else _maxrss()


def peak_resident_memory() -> int | None:
    """This process's peak resident set size so far, in bytes (ru_maxrss, which the kernel updates a little
    behind the current size: never less than that), or None where neither can be read."""
    known = [n for n in (_maxrss(), _statm_resident()) if n is not None]
    return max(known) if known else None


def cpu_model() -> str | None:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        # x86: "model name"; many ARM kernels only give "Hardware" or nothing useful
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or None


def _version(module: str) -> str | None:
    for dist in _DISTRIBUTIONS.get(module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        except Exception:  # a broken dist-info must not break a report
            continue
    loaded = sys.modules.get(module)  # e.g. JetPack's tensorrt, installed without dist metadata
    return str(getattr(loaded, "__version__", None) or "") or None


def library_versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata: nothing is imported."""
    return {"gprebn_edge": __version__, "python": platform.python_version(),
            **{name: _version(name) for name in _DISTRIBUTIONS}}


def _torch_cuda() -> dict[str, Any] | None:
    """GPU facts from torch, only where torch is already imported (importing it for a report would cost
    seconds and memory on a serving box that runs ONNX or engines)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {"source": "torch", "cuda": torch.version.cuda, "gpu": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "memory_mb": round(props.total_memory / 2**20), "device_count": torch.cuda.device_count()}
    except Exception:
        return None


def _nvidia_smi() -> dict[str, Any] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,compute_cap,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        return None
    fields = [f.strip() for f in lines[0].split(",")]
    fields += [""] * (4 - len(fields))
    return {"source": "nvidia-smi", "gpu": fields[0] or None, "driver": fields[1] or None,
            "compute_capability": fields[2] or None, "memory_mb": fields[3] or None, "device_count": len(lines)}


def _nvpmodel() -> dict[str, Any] | None:
    exe = shutil.which("nvpmodel")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    name = next((line.split(":", 1)[1].strip() for line in lines if "Power Mode" in line), None)
    mode = next((int(line) for line in lines if line.isdigit()), None)
    return {"name": name, "id": mode} if name is not None or mode is not None else None


def jetson_info() -> dict[str, Any] | None:
    """L4T release, board, nvpmodel power mode and GPU/memory clocks (Hz) of a Jetson; None elsewhere."""
    release = _read("/etc/nv_tegra_release")
    board = _read("/proc/device-tree/model")
    if release is None and not (board and "jetson" in board.lower()):
        return None
    gpu_freq = next((f for p in _GPU_FREQ_GLOBS for f in map(_read_int, sorted(glob.glob(p))) if f), None)
    emc_freq = next((f for f in map(_read_int, _EMC_FREQ_FILES) if f), None)
    return {"l4t": release.splitlines()[0] if release else None, "board": board, "power_mode": _nvpmodel(),
            "gpu_freq_hz": gpu_freq, "emc_freq_hz": emc_freq}


def describe_environment(runner_info: RunnerInfo | None = None) -> dict[str, Any]:
    """A JSON-able description of this machine (and of the runner, when given)."""
    env: dict[str, Any] = {}
    probes: dict[str, Any] = {
        "host": platform.node,
        "os": platform.platform,
        "machine": platform.machine,
        "cpu": cpu_model,
        "cpu_count": os.cpu_count,
        "cpu_affinity": lambda: len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version,
        "versions": library_versions,
        "gpu": lambda: _torch_cuda() or _nvidia_smi(),
        "jetson": jetson_info,
    }
    for key, probe in probes.items():
        try:
            env[key] = probe()
        except Exception:
            env[key] = None
    if runner_info is not None:
        try:
            env["runner"] = asdict(runner_info)
        except Exception:
            env["runner"] = None
    return env
