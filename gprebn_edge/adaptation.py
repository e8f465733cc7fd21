"""The adapt stage as a library call: model + calibration data + method -> static adapted model and the
metadata of its checkpoint. The CLI's `adapt` and the demo are thin callers of `adapt_model`/`adapt_to_file`.

Passes (docs/budget.md): one online pass over the calibration images (forward + backward for gradient
methods, forward only for statistics methods, none for `source`), the refresh pass where the freeze mode
asks for it, and the health check's two forwards over the held-back slice. The before/after figures of
the summary come from the health check's slice; scoring the whole calibration set again is opt-in
(AdaptConfig.eval_limit). Images stream through batch by batch; no pass holds the decoded set."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gprebn_edge import __version__
from gprebn_edge.budget import MemoryPlan, plan_memory, release_memory
from gprebn_edge.checkpoint import encode_tensors, save_checkpoint
from gprebn_edge.data.holdout import split_holdout
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import ImageSource, open_source
from gprebn_edge.errors import GprebnError, InputError
from gprebn_edge.health import COLLAPSED, NON_FINITE, Thresholds, advice, assess, holdout_size, unchecked
from gprebn_edge.methods import Adapter, StatsConfig, entropy, make_adapter
from gprebn_edge.models.spec import LoadedModel, batchnorm_layers, load_model
from gprebn_edge.validate import flag_number, oneline

__all__ = ["AdaptConfig", "AdaptResult", "AdaptationRefused", "adapt_and_freeze", "adapt_model", "adapt_to_file",
           "calibration_tensors", "check_health", "evaluate", "probe", "probe_input", "run_online", "statistics_shift",
           "StageProgress"]

Progress = Callable[[int, int], None]
StageProgress = Callable[[str, int, int], None]
"""report(stage, done, total): adapt's stages ("adapting (gprebn)", "refreshing statistics") in images."""


@dataclass
class AdaptConfig:
    """Everything that decides an adaptation run (recorded in the artifact)."""

    method: str = "gprebn"
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    lr_scaling: str = "sqrt"
    stats: StatsConfig = field(default_factory=StatsConfig)
    freeze: str | None = None          # None: the method's default
    refresh_batch: int = 64
    eval_limit: int = 0                 # >0: also score this many calibration images before/after (2 more passes)
    holdout: float = 0.1                # fraction of calibration images held back for the health check
    seed: int = 0
    max_memory: int | None = None       # bytes the process may peak at (budget.plan_memory); None: no limit

    def __post_init__(self) -> None:
        flag_number(self.batch_size, "--batch-size", low=1)
        if not 0.0 <= self.holdout <= 0.5:  # also refuses NaN
            raise GprebnError(f"--holdout must be a fraction in [0, 0.5], got {self.holdout}")
        if self.max_memory is not None and self.max_memory < 1:
            raise GprebnError(f"--max-memory must be positive, got {self.max_memory}")

    def adapter_kwargs(self) -> dict[str, Any]:
        return {"lr": self.lr, "optimizer": self.optimizer, "lr_scaling": self.lr_scaling, "stats": self.stats}


class AdaptationRefused(GprebnError):
    """The health check says the adapted model must not be written (non-finite, or collapsed unless forced)."""


@dataclass
class AdaptResult:
    model: nn.Module                   # static, eval mode, the user's architecture
    metadata: dict[str, Any]
    summary: dict[str, Any]


def calibration_tensors(source: ImageSource, batch_size: int) -> Iterator[torch.Tensor]:
    """The preprocessed images of `source` as tensors, batch by batch."""
    for batch in source.batches(batch_size):
        yield torch.from_numpy(batch.images)


@torch.inference_mode()
def evaluate(model: nn.Module, source: ImageSource, limit: int | None = None,
             batch_size: int = 64) -> dict[str, float | int | None]:
    """Mean entropy, confidence and (with labels) error of an eval-mode model on the first `limit` items."""
    model.eval()
    n = correct = 0
    ent = conf = 0.0
    for batch in source.batches(batch_size):
        x = torch.from_numpy(batch.images)
        if limit is not None:
            x = x[: limit - n]
        logits = model(x)
        ent += float(entropy(logits).sum())
        conf += float(logits.softmax(1).amax(1).sum())
        if batch.labels is not None:
            correct += int((logits.argmax(1).numpy() == batch.labels[: len(x)]).sum())
        n += len(x)
        if limit is not None and n >= limit:
            break
    if n == 0:
        raise InputError(f"no readable images in {source.spec}")
    return {"images": n, "entropy": ent / n, "confidence": conf / n,
            "error": 1.0 - correct / n if source.has_labels else None}


@torch.no_grad()
def statistics_shift(before: nn.Module, after: nn.Module) -> list[dict[str, Any]]:
    """Per BN layer: how far the adapted statistics and affine moved, in units of the source statistics."""
    rows = []
    after_layers = dict(batchnorm_layers(after))
    for name, b in batchnorm_layers(before):
        a = after_layers[name]
        assert a.running_var is not None and b.running_var is not None
        assert a.running_mean is not None and b.running_mean is not None
        s_std = torch.sqrt(b.running_var + b.eps)
        a_std = torch.sqrt(a.running_var + a.eps)
        rows.append({
            "layer": name,
            "mean_shift": float(((a.running_mean - b.running_mean).abs() / s_std).mean()),
            "std_ratio": float((a_std / s_std).mean()),
            "weight_change": float((a.weight - b.weight).abs().mean()),
            "bias_change": float((a.bias - b.bias).abs().mean()),
        })
    return rows


def run_online(adapter: Adapter, source: ImageSource, batch_size: int,
               progress: Progress | None = None, score: bool = True) -> dict[str, Any]:
    """One pass over the calibration stream: adapt on each batch, score the predictions it made. With
    `score` False, a method that changes nothing (`source`) makes no pass: its online figures are None."""
    n = correct = 0
    ent = 0.0
    counts = None
    total = len(source)
    if not score and adapter.name == "source":
        return {"images": total, "steps": 0, "online_error": None, "online_entropy": None,
                "predicted_classes": None}
    for batch in source.batches(batch_size):
        x = torch.from_numpy(batch.images)
        try:
            logits = adapter.step(x)
        except ValueError as e:
            if "more than 1 value per channel" not in str(e):
                raise
            raise GprebnError(f"method {adapter.name} normalizes with batch statistics, which need more than one "
                              "value per channel (a BatchNorm1d at batch 1 has one): use a larger --batch-size "
                              "or --method gprebn / adabn") from None
        if not torch.isfinite(logits).all():
            raise GprebnError(f"adaptation diverged at image {n}: non-finite logits; lower --lr")
        pred = logits.argmax(1).numpy()
        counts = np.bincount(pred, minlength=logits.shape[1]) + (0 if counts is None else counts)
        ent += float(entropy(logits).sum())
        if batch.labels is not None:
            correct += int((pred == batch.labels).sum())
        n += len(x)
        if progress is not None:
            progress(n, total)
    if n == 0:
        raise InputError(f"no readable images in {source.spec}")
    return {
        "images": n,
        "steps": adapter.steps,
        "online_error": 1.0 - correct / n if source.has_labels else None,
        "online_entropy": ent / n,
        "predicted_classes": int((counts > 0).sum()) if counts is not None else 0,
    }


def adapt_and_freeze(model: nn.Module, source: ImageSource, config: AdaptConfig,
                     progress: StageProgress | None = None, plan: MemoryPlan | None = None,
                     score_source: bool = True, no_grad_batch: int | None = None
                     ) -> tuple[nn.Module, dict[str, Any], Adapter]:
    """One online pass of `config.method` over `source`, then freeze (the method's default mode unless
    config.freeze names one it supports). Returns the static model, the online figures (with the images
    each pass ran, "passes") and the adapter. `plan` (budget.plan_memory) bounds the memory of each step;
    `score_source` False skips the pass of `source`, which changes nothing; `no_grad_batch` slices the
    refresh's batches (of config.refresh_batch images) into forwards of at most that many."""
    torch.manual_seed(config.seed)
    adapter = make_adapter(config.method, model, **config.adapter_kwargs())
    if plan is not None:
        plan.apply(adapter)
    if no_grad_batch is not None:
        adapter.no_grad_batch = min(no_grad_batch, adapter.no_grad_batch or no_grad_batch)
    what = f"adapting ({config.method})"
    online = run_online(adapter, source, config.batch_size,
                        None if progress is None else lambda done, total: progress(what, done, total),
                        score=score_source)
    freeze = config.freeze or adapter.freeze_modes[0]
    refreshed = [0]
    release_memory()  # the online pass's freed blocks, before the refresh allocates in another pattern

    def refresh_batches() -> Iterator[torch.Tensor]:
        # read no more images than a forward takes: the estimate does not depend on how the pass is batched,
        # and 64 decoded images held for a batch-4 run were a third of its peak (EfficientNet-Lite0)
        for x in calibration_tensors(source, min(config.refresh_batch, adapter.no_grad_batch or config.refresh_batch)):
            yield x
            refreshed[0] += len(x)
            if progress is not None:
                progress("refreshing statistics", refreshed[0], len(source))

    static = adapter.freeze(freeze, refresh_batches)
    ran = 0 if online["online_entropy"] is None else online["images"]
    return static, {**online, "freeze": freeze, "passes": {"online": ran, "refresh": refreshed[0]}}, adapter


def adapt_model(loaded: LoadedModel, source: ImageSource, config: AdaptConfig,
                progress: StageProgress | None = None) -> AdaptResult:
    """Adapt `loaded.model` on `source` with `config.method`, freeze it, and describe what happened.
    With config.max_memory, a memory plan (budget.py) chooses the micro-batch and checkpointing first."""
    clock = time.perf_counter()
    num_classes, shape = probe_input(loaded.model, source, loaded.spec.spec)
    k = holdout_size(len(source), config.holdout)
    plan = None
    if config.max_memory is not None:
        plan = plan_memory(loaded.model, shape, config.method, config.batch_size, config.max_memory,
                           refresh_batch=config.refresh_batch, **config.adapter_kwargs())
    # passes without gradients (refresh, health check) run at no more images than a step: a run at batch 4
    # must not peak at a 64-image forward
    eval_batch = plan.no_grad_batch if plan is not None else config.batch_size
    calib, held = split_holdout(source, k)
    stages = {"probe": time.perf_counter() - clock}
    clock = start = time.perf_counter()
    static, online, adapter = adapt_and_freeze(loaded.model, calib, config, progress, plan, score_source=False,
                                               no_grad_batch=eval_batch)
    freeze = online["freeze"]
    method = {**adapter.hparams(), "batch_size": config.batch_size, "freeze": freeze,
              "refresh_batch": config.refresh_batch if freeze == "refresh" else None,
              "refresh_forward_batch": adapter.no_grad_batch if freeze == "refresh" else None, "seed": config.seed}
    del adapter  # its working copy of the model (and optimizer state) is not needed by the health check
    elapsed = time.perf_counter() - start
    stages["adapt"] = elapsed

    clock = time.perf_counter()
    release_memory()
    health = check_health(loaded.model, static, held, eval_batch, len(source), config.holdout)
    held_images = int(health["images"])
    passes = {"probe": 1, **online.pop("passes"), "health": 2 * held_images}
    if held is None and config.method != "source":  # nothing held back to check: at least outputs must be finite
        first = next(iter(calibration_tensors(calib, eval_batch)))
        with torch.inference_mode():
            finite = bool(torch.isfinite(static(first)).all())
        passes["finite_check"] = len(first)
        if not finite:
            health = {**health, "verdict": NON_FINITE, "signals": [
                "the adapted model's outputs on the calibration images are not finite (NaN or Inf)"]}
    before, after = _held_back_figures(health)
    if config.eval_limit:  # opt-in: score the calibration set itself, two more passes
        limit = min(config.eval_limit, len(calib))
        before = evaluate(loaded.model, calib, limit, eval_batch)
        after = evaluate(static, calib, limit, eval_batch) if health["verdict"] != NON_FINITE else None
        passes["evaluate"] = before["images"] + (after["images"] if after else 0)  # type: ignore[operator]
        if after is not None and not math.isfinite(float(after["entropy"] or 0.0)):
            health = {**health, "verdict": NON_FINITE, "signals": [
                "the adapted model's outputs on the calibration images are not finite (NaN or Inf)"]}
            after = None
    stages["health"] = time.perf_counter() - clock
    summary = {
        **online,
        "seconds": round(elapsed, 3),
        "stage_seconds": {name: round(v, 3) for name, v in stages.items()},
        "passes": passes,
        "memory_plan": plan.to_dict() if plan is not None else None,
        "skipped": len(source.skipped),
        "held_back": held_images,
        "calibration_before": before,
        "calibration_after": after,
        "health": health,
    }
    source_bn = {k: v for k, v in loaded.model.state_dict().items()
                 if k.rsplit(".", 1)[0] in dict(batchnorm_layers(loaded.model))}
    metadata = {
        "gprebn_edge_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": loaded.spec.to_dict(),
        "preprocess": loaded.preprocess.to_dict(),
        "method": method,
        "calibration": {**calib.describe(), "fingerprint": source.fingerprint(),
                        "skipped_items": [list(s) for s in source.skipped[:20]]},
        "summary": summary,
        "statistics_shift": statistics_shift(loaded.model, static),
        "source_bn": encode_tensors(source_bn),
        "num_classes": num_classes,
    }
    return AdaptResult(model=static, metadata=metadata, summary=summary)


def adapt_to_file(model: str, data: str, output: str | Path, config: AdaptConfig, *,
                  weights: str | None = None, num_classes: int | None = None,
                  preprocess: dict[str, Any] | None = None, shuffle: bool = True, limit: int | None = None,
                  force: bool = False, progress: StageProgress | None = None) -> AdaptResult:
    """Load the model and data, adapt, write the checkpoint atomically. `preprocess` overrides the model's
    default preprocessing field by field (resize, crop, mean, std). The health check decides what is written:
    a non-finite model never, a collapsed one only with `force` (AdaptationRefused otherwise, and an existing
    file at `output` is left as it was); a suspect one is written with its verdict in the metadata."""
    output = Path(output)
    if output.suffix != ".safetensors":
        raise GprebnError(f"-o/--output must end in .safetensors, got {output.name}")
    if not output.parent.exists():
        raise GprebnError(f"output folder {output.parent} does not exist: create it first")
    loaded = load_model(model, weights, num_classes)
    if preprocess:
        fields = {**loaded.preprocess.to_dict(), **{k: v for k, v in preprocess.items() if v is not None}}
        loaded.preprocess = Preprocess.from_dict(fields)
    source = open_source(data, loaded.preprocess, shuffle=shuffle, seed=config.seed, limit=limit)
    result = adapt_model(loaded, source, config, progress)
    health = result.summary["health"]
    if health["verdict"] == NON_FINITE or (health["verdict"] == COLLAPSED and not force):
        override = "" if health["verdict"] == NON_FINITE else " (--force writes it anyway)"
        raise AdaptationRefused(f"not written: {advice(health)}{override}")
    save_checkpoint(output, result.model.state_dict(), result.metadata)
    return result


def check_health(unadapted: nn.Module, adapted: nn.Module, held: ImageSource | None, batch_size: int,
                 calibration_images: int, holdout: float) -> dict[str, Any]:
    """The health record of an adaptation (health.py) on the held-back images, read `batch_size` at a time
    (with their labels where the calibration data has them), or why there is none."""
    if held is None:
        reason = "--holdout 0" if holdout == 0 else (
            f"only {calibration_images} calibration images, too few to hold any back (at least "
            f"{Thresholds().min_images} needed); statistics from so few images are unreliable: add images")
        return unchecked(reason)
    before, labels = held_logits(unadapted, held, batch_size)
    after, _ = held_logits(adapted, held, batch_size)
    return assess(before, after, labels)


def held_logits(model: nn.Module, held: ImageSource, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """An eval-mode model's logits on the held-back images and their labels (None where any is missing);
    its mode is restored afterwards."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        with torch.inference_mode():
            for b in held.batches(batch_size):
                logits.append(model(torch.from_numpy(b.images)).float().numpy())
                labels.append(b.labels)
    finally:
        model.train(was_training)
    known = [lab for lab in labels if lab is not None]
    return np.concatenate(logits), (np.concatenate(known) if len(known) == len(labels) else None)


def _non_finite_cause(model: nn.Module, images: np.ndarray, name: str) -> str:
    """Why a model's outputs are not finite: its inputs (the preprocessing), its weights, or the model itself."""
    if not np.isfinite(images).all():
        return (f"the preprocessed images are not finite (NaN or Inf) before {name} sees them: check the "
                "preprocessing (--mean, --std, or the model's default)")
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        more = f" and {len(bad) - 1} more hold" if len(bad) > 1 else " holds"
        return (f"the weights of {name} are not finite: {bad[0]}{more} NaN or Inf; check --weights or the factory")
    return f"{name} returned non-finite logits on finite images with finite weights: check the model's forward"


def probe(model: nn.Module, source: ImageSource, name: str) -> int:
    """Run one image through the model before any work, so a wrong input size fails with a clear message.
    Returns the number of classes."""
    return probe_input(model, source, name)[0]


def probe_input(model: nn.Module, source: ImageSource, name: str) -> tuple[int, tuple[int, ...]]:
    """probe, and the shape of one preprocessed image: (classes, (C, H, W))."""
    for batch in source.batches(1):
        try:
            with torch.inference_mode():
                out = model(torch.from_numpy(batch.images))
        except RuntimeError as e:
            shape = tuple(batch.images.shape[1:])
            raise InputError(f"{name} cannot run on images of shape {shape} ({oneline(e, 120)}); "
                             "set --resize/--crop to the model's input size") from None
        if out.dim() != 2:
            raise InputError(f"{name} must return (N, classes) logits, got shape {tuple(out.shape)}")
        if not torch.isfinite(out).all():
            raise InputError(_non_finite_cause(model, batch.images, name))
        return int(out.shape[1]), tuple(batch.images.shape[1:])
    raise InputError(f"no readable images in {source.spec}")


def _held_back_figures(health: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The summary's before/after figures, taken from the health check's slice (no pass of their own)."""
    if not health.get("images"):
        return None, None
    labeled = health.get("labeled") or {}
    out = []
    for side in ("before", "after"):
        prof = health.get(side) or {}
        acc = labeled.get(f"accuracy_{side}")
        out.append({"on": "held-back", "images": health["images"], "entropy": prof.get("entropy"),
                    "confidence": prof.get("confidence"), "error": None if acc is None else 1.0 - acc})
    return out[0], out[1]
