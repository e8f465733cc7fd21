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

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gprebn_edge.adaptation import statistics_shift
from gprebn_edge.budget import MemoryPlan, plan_memory
from gprebn_edge.checkpoint import rebuild_model, save_checkpoint
from gprebn_edge.consent import CodeConsent
from gprebn_edge.device.stop import StopToken
from gprebn_edge.errors import ArtifactError, GprebnError
from gprebn_edge.methods import make_adapter
from gprebn_edge.methods.stats import StatsConfig
from gprebn_edge.models.spec import batchnorm_layers
from gprebn_edge.runtime.torch_runner import torch_threads
from gprebn_edge.validate import flag_number

__all__ = ["ReadaptConfig", "Candidate", "Diverged", "Readapter", "stats_drift", "input_shift", "REFRESH_BATCH"]

LOOP_RESERVE = 0.05  # of --max-memory, for what a round holds beside its plan: the export (torch.onnx.export, a
                     # parity session) and the gates' onnxruntime arenas (one EfficientNet-Lite0 run without it
                     # peaked at 2.04 GB under 2GB; with it: benchmarks/results/loop_memory.md)
REFRESH_BATCH = 64  # frames per batch of a candidate's statistics refresh (a memory plan splits them further)


class Diverged(GprebnError):
    """Adaptation itself blew up (non-finite outputs): a verdict on the candidate, not a bug."""


@dataclass
class ReadaptConfig:
    batch_size: int = 64
    lr: float = 1e-3
    momentum: float = 0.1   # EMA rate per 64 frames for the statistics while adapting
    threads: int = 1        # torch threads for the worker (the serving runner keeps the others)
    consent: CodeConsent | None = None  # to the model code the checkpoint names (user code needs it)
    max_memory: int | None = None  # bytes the loop's process may peak at (budget.plan_memory); None: no limit
    buffer: int = 512       # frames a snapshot holds at most (what the memory plan reserves for it)

    def __post_init__(self) -> None:
        flag_number(self.batch_size, "the adaptation batch size", low=1)
        flag_number(self.max_memory, "--max-memory", low=1)


@dataclass
class Candidate:
    model: torch.nn.Module          # static eval-mode model of the user's architecture
    steps: int
    seconds: float
    stats_drift: float
    info: dict[str, Any] = field(default_factory=dict)


def stats_drift(old: torch.nn.Module, new: torch.nn.Module) -> float:
    """Mean over BN layers of mean |mu_new - mu_old| / sigma_old: how far the statistics moved, in units of
    the serving model's standard deviations (the per-layer figure `adapt` records as statistics_shift)."""
    rows = statistics_shift(old, new)
    return float(np.mean([r["mean_shift"] for r in rows])) if rows else 0.0


@torch.no_grad()
def input_shift(model: torch.nn.Module, frames: torch.Tensor, batch: int | None = None) -> float:
    """How unfamiliar `frames` are to an eval-mode `model`: mean over its BN layers of mean over channels of
    |mu_frames - mu_running| / sigma_running, where mu_frames is the mean of the layer's input over the
    frames. Near 0 on the domain the statistics were estimated on; several sigmas on a new one. The frames
    go through `batch` at a time (default: all at once); the means are over all of them either way."""
    layers = [(bn, bn.running_mean, bn.running_var, bn.eps) for _, bn in batchnorm_layers(model)
              if bn.running_mean is not None and bn.running_var is not None]
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(i: int) -> Callable[..., None]:
        def pre(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            total = x.sum(dim=[d for d in range(x.dim()) if d != 1], dtype=torch.float64)
            sums[i] = sums[i] + total if i in sums else total
            counts[i] = counts.get(i, 0) + x.numel() // x.shape[1]
        return pre

    handles = [bn.register_forward_pre_hook(hook(i)) for i, (bn, *_) in enumerate(layers)]
    try:
        for chunk in torch.split(frames, batch or max(1, len(frames))):
            model(chunk)
    finally:
        for h in handles:
            h.remove()
    shifts = [float((((sums[i] / counts[i]).float() - mean).abs() / (var + eps).sqrt()).mean())
              for i, (_, mean, var, eps) in enumerate(layers) if i in sums]
    return float(np.mean(shifts)) if shifts else 0.0


def _source_model(checkpoint: str | Path, consent: CodeConsent | None) -> torch.nn.Module | None:
    """The unadapted model, or None when the checkpoint holds no source BN statistics."""
    try:
        return rebuild_model(checkpoint, "source", consent=consent)[0]
    except ArtifactError as e:
        if "holds no source BatchNorm tensors" in str(e):
            return None
        raise


class Readapter:
    """Owns the adapter; `round(frames)` returns a frozen candidate; `save` writes it as a checkpoint."""

    serving: torch.nn.Module   # eval copy of what serves: drift and input shift are measured against it
    meta: dict[str, Any]

    def __init__(self, checkpoint: str | Path, config: ReadaptConfig | None = None) -> None:
        self.config = config or ReadaptConfig()
        self._threads = contextlib.ExitStack()  # torch's thread count, put back by close()
        self._threads.enter_context(torch_threads(max(1, self.config.threads)))
        # held in memory: the state folder deletes a round's files once another round serves
        model, meta = rebuild_model(checkpoint, "adapted", consent=self.config.consent)
        self.plan: MemoryPlan | None = None  # made before every round (the frames' shape is known then)
        self._start_model = copy.deepcopy(model)
        self._source = _source_model(checkpoint, self.config.consent)
        self._adapt_from(model, meta)

    def close(self) -> None:
        """Put the torch thread count back as it was."""
        self._threads.close()

    def reset_to(self, checkpoint: str | Path) -> None:
        """Restart adaptation from `checkpoint` (an adapted artifact: the round that serves)."""
        self._adapt_from(*rebuild_model(checkpoint, "adapted", consent=self.config.consent))

    def restart(self) -> None:
        """Restart adaptation from the run's starting checkpoint, keeping what serves (drift and input shift
        are still measured against it): after a detected shift, what was learnt on the previous domain (its
        gamma/beta and statistics) would only hold the new domain's adaptation back."""
        serving = self.serving
        self._adapt_from(copy.deepcopy(self._start_model), self.meta)
        self.serving = serving

    def _adapt_from(self, model: torch.nn.Module, meta: dict[str, Any]) -> None:
        """A new adapter on `model`, which then serves (an untouched copy of it is what serves)."""
        self.meta = meta
        self.serving = copy.deepcopy(model).eval()
        self.adapter = make_adapter("gprebn", model, **self._hparams())
        if self.plan is not None:
            self.plan.apply(self.adapter)

    @property
    def no_grad_batch(self) -> int:
        """Frames per forward without gradients: the memory plan's, else the adaptation batch size (a gate's
        forward on all the held-back frames at once would outgrow a round's step)."""
        return self.config.batch_size if self.plan is None else self.plan.no_grad_batch

    def _plan_memory(self, frames: torch.Tensor) -> None:
        """With --max-memory: plan this round's micro-batch (and checkpointing). The process as it is now is
        the fixed part (it grows between rounds: a swapped-in model, the buffer filling, the heap), plus the
        buffer still to fill and its stacked copy; the model's footprint is measured on the first round only.
        BudgetError (one line) when even one frame does not fit."""
        if self.config.max_memory is None:
            return
        growth = 2 * max(0, self.config.buffer - len(frames))
        self.plan = plan_memory(self.serving, tuple(frames.shape[1:]), "gprebn", self.config.batch_size,
                                self.config.max_memory, refresh_batch=REFRESH_BATCH, held_images=growth,
                                reserve_bytes=int(LOOP_RESERVE * self.config.max_memory),
                                measured=None if self.plan is None else self.plan.footprint,
                                **self._hparams())
        self.plan.apply(self.adapter)

    def _hparams(self) -> dict[str, Any]:
        """The adapter's hyperparameters: the memory plan measures a step made with the same."""
        return {"lr": self.config.lr, "stats": StatsConfig(momentum=self.config.momentum, init="source")}

    def accept(self, candidate: Candidate) -> None:
        """The candidate now serves: drift is measured against it from here on."""
        self.serving = candidate.model

    @torch.no_grad()
    def source_logits(self, frames: np.ndarray) -> np.ndarray | None:
        """The unadapted (source) model's logits on `frames`: the gates' third opinion (None when the
        checkpoint holds no source statistics)."""
        if self._source is None:
            return None
        x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
        return torch.cat([self._source(c) for c in torch.split(x, self.no_grad_batch)]).numpy()

    def input_shift(self, frames: np.ndarray) -> float:
        """How far `frames` are from the serving model's BN statistics (see input_shift)."""
        return input_shift(self.serving, torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)),
                           self.no_grad_batch)

    def round(self, frames: np.ndarray, stop: StopToken | None = None) -> Candidate:
        """Adapt on `frames` (float32 NCHW, in stream order) and freeze a candidate. `stop` is checked before
        each step: once set, Stopped is raised and the adapter keeps what it learnt so far. Non-finite outputs
        raise Diverged."""
        if len(frames) == 0:
            raise GprebnError("no frames to adapt on")
        start = time.perf_counter()
        b = self.config.batch_size
        x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
        self._plan_memory(x)
        steps = 0
        for i in range(0, len(x), b):
            if stop is not None:
                stop.check()
            logits = self.adapter.step(x[i:i + b])
            if not torch.isfinite(logits).all():
                raise Diverged(f"adaptation step {steps + 1} gave non-finite outputs")
            steps += 1
        model = self.adapter.freeze("refresh", lambda: torch.split(x, REFRESH_BATCH))  # the plan splits further
        return Candidate(model=model, steps=steps, seconds=time.perf_counter() - start,
                         stats_drift=stats_drift(self.serving, model))

    def save(self, candidate: Candidate, path: Path, round_id: int, frames: int) -> Path:
        """The candidate as an adapted artifact (same metadata as the loop's starting checkpoint, so the
        unadapted model can still be rebuilt from it), with the loop's round recorded."""
        meta = {k: v for k, v in self.meta.items() if k not in ("format", "format_version")}
        meta["loop"] = {"round": round_id, "frames": frames, "steps_total": self.adapter.steps,
                        "stats": {"momentum": self.config.momentum, "lr": self.config.lr,
                                  "batch_size": self.config.batch_size},
                        "memory_plan": None if self.plan is None else self.plan.to_dict()}
        return save_checkpoint(path, candidate.model.state_dict(), meta)
