"""Shared by the benchmark scripts: where results go, what the environment was, atomic JSON/markdown."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gprebn_edge import __version__
from gprebn_edge.io import strict_json, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gprebn_edge": __version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_results(stem: Path, payload: dict[str, Any], markdown: str) -> None:
    """stem.json and stem.md (appended, so a dotted stem like "lr0.1" keeps its name), written atomically."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stem.parent / f"{stem.name}.json", strict_json(payload, indent=1) + "\n")
    write_text_atomic(stem.parent / f"{stem.name}.md", markdown)


def environment_line(env: dict[str, Any]) -> str:
    return "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items())


def publish(stem: Path, payload: dict[str, Any], lines: list[str]) -> None:
    """Close a markdown table with the environment line, write stem.json/.md and print the markdown."""
    markdown = "\n".join([*lines, "", environment_line(payload["environment"]), ""])
    write_results(stem, payload, markdown)
    print(markdown)


def run_child(cmd: list[str]) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS bytes, exit code, stderr tail) of one fresh process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-600:]
    return wall, usage.ru_maxrss * 1024, proc.returncode, tail
