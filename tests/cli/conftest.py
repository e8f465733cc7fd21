"""Shared CLI fixtures: one small adapted checkpoint of the built-in model, its folded ONNX export and a
short loop metrics log, made once per module."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from gprebn_edge.adaptation import AdaptConfig, adapt_to_file
from gprebn_edge.device.histogram import LAYOUT, LatencyHistogram
from gprebn_edge.export.pipeline import export_artifact

DATA = "synthetic:fog:5:n=64"


@dataclass(frozen=True)
class Made:
    checkpoint: Path
    onnx: Path
    log: Path


def _window(frames: int) -> dict:
    lat = [1.0, 2.0, 3.0]
    return {"event": "window", "t": frames / 100, "frames": frames, "n": 100, "served_round": 0,
            "latency_ms": {"p50": 2.0, "p90": 3.0, "p99": 3.0, "mean": 2.0}, "latency_idle_ms": None,
            "latency_adapting_ms": None, "adapting_fraction": 0.0, "mean_entropy": 1.0, "labeled": 100,
            "correct": 60, "by_segment": {"clean#0": [60, 100]},
            "latency_hist_ms": {**LAYOUT, "idle": LatencyHistogram(lat).to_json(),
                                "adapting": LatencyHistogram([]).to_json()}}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Made:
    folder = tmp_path_factory.mktemp("cli")
    checkpoint = folder / "adapted.safetensors"
    adapt_to_file("builtin:small_resnet", DATA, checkpoint, AdaptConfig(batch_size=32))
    manifest = export_artifact(checkpoint, folder / "adapted.onnx", check_images=32)
    records = [{"event": "start", "t": 0.0, "resumed": False, "round": 0, "frames": 0, "config": {}},
               _window(100), _window(200), {"event": "stop", "t": 2.0, "frames": 200, "reason": "end of stream"}]
    log = folder / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return Made(checkpoint, Path(manifest["onnx"]), log)
