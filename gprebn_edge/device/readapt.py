"""The device loop's re-adaptation (adapt stage, torch): continue GpreBN on a snapshot of recent frames,
freeze a candidate and save it as a checkpoint. The loop (device/worker.py) imports this only when it adapts, so
serving needs no torch.

Continuing: one GpreBN adapter lives for the whole run. Each round takes a few entropy steps (batches of
`batch_size` frames) on the snapshot, so gamma/beta keep moving from where the last round left them, with
the statistics estimated as an EMA (rate `momentum` per 64 frames) so that they follow the stream instead
of averaging over everything ever seen. The candidate is then frozen with a statistics refresh over the
snapshot (the served statistics are those of the recent frames under the new gamma/beta). `reset_to`
restarts the adapter from a checkpoint (the last good round)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gprebn_edge.checkpoint import rebuild_model, save_checkpoint
from gprebn_edge.consent import CodeConsent
from gprebn_edge.errors import GprebnError
from gprebn_edge.methods import make_adapter
from gprebn_edge.methods.stats import StatsConfig

__all__ = ["ReadaptConfig", "Candidate", "Readapter", "stats_drift"]


@dataclass
class ReadaptConfig:
    batch_size: int = 64
    lr: float = 1e-3
    momentum: float = 0.1   # EMA rate per 64 frames for the statistics while adapting
    threads: int = 1        # torch threads for the worker (the serving runner keeps the others)
    consent: CodeConsent | None = None  # to the model code the checkpoint names (user code needs it)


@dataclass
class Candidate:
    model: torch.nn.Module          # static eval-mode model of the user's architecture
    steps: int
    seconds: float
    stats_drift: float
    info: dict[str, Any] = field(default_factory=dict)


def _bn_stats(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from torch.nn.modules.batchnorm import _BatchNorm

    return {name: (m.running_mean.detach().clone(), m.running_var.detach().clone())
            for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None}


def stats_drift(old: torch.nn.Module, new: torch.nn.Module) -> float:
    """Mean over BN layers of mean |mu_new - mu_old| / sigma_old: how far the statistics moved, in units of
    the serving model's standard deviations."""
    a, b = _bn_stats(old), _bn_stats(new)
    shifts = [float(((b[k][0] - mu).abs() / (var + 1e-5).sqrt()).mean()) for k, (mu, var) in a.items() if k in b]
    return float(np.mean(shifts)) if shifts else 0.0


class Readapter:
    """Owns the adapter; `round(frames)` returns a frozen candidate; `save` writes it as a checkpoint."""

    def __init__(self, checkpoint: str | Path, config: ReadaptConfig | None = None) -> None:
        self.config = config or ReadaptConfig()
        if self.config.batch_size < 1:
            raise GprebnError(f"the adaptation batch size must be at least 1, got {self.config.batch_size}")
        torch.set_num_threads(max(1, self.config.threads))
        self.reset_to(checkpoint)

    def reset_to(self, checkpoint: str | Path) -> None:
        """Restart adaptation from `checkpoint` (an adapted artifact: the round that serves)."""
        model, meta = rebuild_model(checkpoint, "adapted", consent=self.config.consent)
        self.meta = meta
        self.serving = model
        stats = StatsConfig(momentum=self.config.momentum, init="source")
        self.adapter = make_adapter("gprebn", model, lr=self.config.lr, stats=stats)

    def accept(self, candidate: Candidate) -> None:
        """The candidate now serves: drift is measured against it from here on."""
        self.serving = candidate.model

    def round(self, frames: np.ndarray) -> Candidate:
        """Adapt on `frames` (float32 NCHW, in stream order) and freeze a candidate."""
        if len(frames) == 0:
            raise GprebnError("no frames to adapt on")
        start = time.perf_counter()
        b = self.config.batch_size
        x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
        steps = 0
        for i in range(0, len(x), b):
            logits = self.adapter.step(x[i:i + b])
            if not torch.isfinite(logits).all():
                raise GprebnError("adaptation produced non-finite logits")
            steps += 1
        model = self.adapter.freeze("refresh", lambda: (x[i:i + 64] for i in range(0, len(x), 64)))
        return Candidate(model=model, steps=steps, seconds=time.perf_counter() - start,
                         stats_drift=stats_drift(self.serving, model))

    def save(self, candidate: Candidate, path: Path, round_id: int, frames: int) -> Path:
        """The candidate as an adapted artifact (same metadata as the loop's starting checkpoint, so the
        unadapted model can still be rebuilt from it), with the loop's round recorded."""
        meta = {k: v for k, v in self.meta.items() if k not in ("format", "format_version")}
        meta["loop"] = {"round": round_id, "frames": frames, "steps_total": self.adapter.steps,
                        "stats": {"momentum": self.config.momentum, "lr": self.config.lr,
                                  "batch_size": self.config.batch_size}}
        return save_checkpoint(path, candidate.model.state_dict(), meta)
