"""The GPU check's sections (benchmarks/gpu_check.py runs them in this order), one module each. Each reads
on its own: what it measures, on which models, and what counts as a failure. Importing this package
imports nothing of gprebn_edge: `sections()` does, after gpu_check.use_tree() has made it importable."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# section -> "module:function"
ORDER = {"install": "install:run", "gpu_tests": "gpu_tests:run", "parity": "parity:run", "adapt": "adapt:run",
         "latency": "latency:run", "step": "step:run", "tensorrt": "tensorrt:run", "step_compiled": "step:run_compiled"}


def sections() -> list[tuple[str, Callable[[Any], None]]]:
    """(name, function of the Check) in running order."""
    out = []
    for name, where in ORDER.items():
        module, function = where.split(":")
        out.append((name, getattr(importlib.import_module(f"gpu_sections.{module}"), function)))
    return out
