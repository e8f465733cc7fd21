"""The interface every adaptation method shares: configure (at construction), `step` on a batch, `reset`,
and `freeze` to a static BatchNorm model of the user's own architecture."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from gprebn_edge.errors import GprebnError
from gprebn_edge.methods.blocks import checkpoint_blocks, uncheckpoint_blocks
from gprebn_edge.methods.layer import gprebn_layers, swap_in, swap_out
from gprebn_edge.methods.stats import REFERENCE_BATCH, StatsConfig

__all__ = ["Adapter", "entropy", "make_optimizer", "reestimate", "Batches"]

ADAM_BETAS = (0.9, 0.999)

Batches = Callable[[], Iterable[torch.Tensor]]
"""Re-iterable calibration inputs, for the final statistics refresh of `freeze`."""


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy (nats) of softmax(logits)."""
    logp = logits.log_softmax(1)
    return -(logp.exp() * logp).sum(1)


def make_optimizer(params: list[nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise GprebnError(f"--optimizer must be 'adam' or 'sgd', got {name!r}")


def reestimate(model: nn.Module, batches: Iterable[torch.Tensor], theta: float = 1.0,
               max_batch: int | None = None) -> nn.Module:
    """Return a static copy of `model` whose BN statistics are the pooled statistics of its own activations
    over `batches` (cumulative, law of total variance), mixed by theta with the source statistics (those of
    a model that is still adapting, else the model's current ones). Each batch is normalized with the
    estimate that already includes it, so the result does not depend on the batch size; `max_batch` splits
    larger batches (a memory budget)."""
    frozen = copy.deepcopy(model).eval()
    config = StatsConfig(momentum=None, theta=theta, init="first", order="before")
    layers = gprebn_layers(frozen)
    for _, layer in layers:
        layer.config = config
        layer.adapting = True
        layer.restart()
    if not layers:
        swap_in(frozen, config)
    count = 0
    with torch.inference_mode():
        for batch in batches:
            for x in (batch.split(max_batch) if max_batch else (batch,)):
                frozen(x)
                count += x.shape[0]
    if count == 0:
        raise GprebnError("no calibration images to re-estimate the statistics from")
    return swap_out(frozen).eval()


class Adapter:
    """Base of the methods. Subclasses set `name`, implement `configure` and `_forward`, and may override
    `freeze`. The adapter works on its own copy of the model; the caller's model is never changed."""

    name: ClassVar[str] = "base"
    #: freeze modes this method supports, the first is its default
    freeze_modes: ClassVar[tuple[str, ...]] = ("direct",)

    def __init__(self, model: nn.Module, *, lr: float = 1e-3, optimizer: str = "adam",
                 lr_scaling: str = "sqrt", stats: StatsConfig | None = None) -> None:
        if lr_scaling not in ("linear", "sqrt", "none"):
            raise GprebnError(f"--lr-scaling must be 'linear', 'sqrt' or 'none', got {lr_scaling!r}")
        if lr <= 0:
            raise GprebnError(f"--lr must be positive, got {lr}")
        self.lr = lr
        self.optimizer_name = optimizer
        self.lr_scaling = lr_scaling
        self.stats = stats or StatsConfig()
        self.model = copy.deepcopy(model)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.configure()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, optimizer, lr) if self.params else None
        # what adapting can change, for reset(): all of the state but the frozen parameters (a frozen weight
        # never changes, and a second copy of every weight was a model's size of memory for nothing)
        frozen = {name for name, p in self.model.named_parameters() if not p.requires_grad}
        self._model_state = {k: copy.deepcopy(v) for k, v in self.model.state_dict().items() if k not in frozen}
        self._optimizer_state = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None
        self.steps = 0
        #: images per forward (and backward) within one step; None: the whole batch (a memory plan sets it)
        self.micro_batch: int | None = None
        #: images per forward in passes without gradients (the refresh of `freeze`); None: as given
        self.no_grad_batch: int | None = None

    # -- the interface -------------------------------------------------------------------------------
    def configure(self) -> None:
        """Prepare self.model for adaptation (swap layers, choose what trains)."""

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Predict on a batch (returned logits, detached) and adapt on it: one optimizer step per batch.

        With `micro_batch` set, the batch runs in slices of that many images: each slice's forward and
        backward use its own batch statistics, the gradients of the batch's mean entropy accumulate over the
        slices, and one optimizer step follows (docs/budget.md). Only one slice's graph is alive at a time."""
        chunks = x.split(self.micro_batch) if self.micro_batch and self.micro_batch < x.shape[0] else (x,)
        if self.optimizer is None:
            with torch.inference_mode():
                outs = [self._forward(c) for c in chunks]
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        n = x.shape[0]
        outs = []
        with torch.enable_grad():
            self.optimizer.zero_grad(set_to_none=True)
            for c in chunks:
                logits = self._forward(c)
                # the batch's mean entropy, a slice at a time
                loss = entropy(logits).mean() if len(chunks) == 1 else entropy(logits).sum() / n
                loss.backward()
                outs.append(logits.detach())
                del logits, loss  # the slice's graph goes before the next slice's forward
            self._scale_hyperparameters(n)
            self.optimizer.step()
        self.steps += 1
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def checkpoint_blocks(self) -> int:
        """Checkpoint the model's blocks (blocks.py): a step then holds one block's activations at a time
        and computes each block's forward twice. Returns the number of blocks (GprebnError when none)."""
        blocks = checkpoint_blocks(self.model)
        if blocks == 0:
            raise GprebnError("the model has no blocks to checkpoint (children of nn.Sequential/nn.ModuleList "
                              "holding a BatchNorm): a larger memory budget is needed")
        return blocks

    def _scale_hyperparameters(self, batch: int) -> None:
        """Keep the adaptation per image independent of the batch size.

        linear: lr x batch/64 (SGD: 64 steps of batch 1 add up to one step of batch 64 to first order).
        sqrt: lr x sqrt(batch/64) and, for Adam, 1 - beta scaled by batch/64, so the moment estimates span
        the same number of images (the square-root rule for adaptive optimizers, Malladi et al. 2022)."""
        assert self.optimizer is not None
        ratio = batch / REFERENCE_BATCH
        for group in self.optimizer.param_groups:
            if self.lr_scaling == "linear":
                group["lr"] = self.lr * ratio
            elif self.lr_scaling == "sqrt":
                group["lr"] = self.lr * ratio ** 0.5
                if "betas" in group:
                    group["betas"] = tuple(1.0 - min(1.0, (1.0 - b) * ratio) for b in ADAM_BETAS)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predict with the current state without adapting (GpreBN layers use their dataset statistics)."""
        layers = [layer for _, layer in gprebn_layers(self.model)]
        for layer in layers:
            layer.adapting = False
        try:
            return self.model(x)
        finally:
            for layer in layers:
                layer.adapting = True

    def reset(self) -> None:
        """Back to the state right after construction (the source model), bit-exactly."""
        self.model.load_state_dict(self._model_state, strict=False)
        if self.optimizer is not None and self._optimizer_state is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))
            self.optimizer.state.clear()
        self.steps = 0

    def freeze(self, mode: str | None = None, batches: Batches | None = None) -> nn.Module:
        """A static eval-mode copy of the user's architecture with plain BatchNorm layers.

        mode "direct" uses the statistics the method holds; "refresh" re-estimates them with a final pass
        over `batches` (the calibration data) under the adapted affine parameters."""
        mode = mode or self.freeze_modes[0]
        if mode not in self.freeze_modes:
            modes = " or ".join(self.freeze_modes)
            raise GprebnError(f"method {self.name} freezes with {modes}, not {mode!r}")
        if mode == "refresh":
            if batches is None:
                raise GprebnError("freeze with refresh needs the calibration batches")
            static = reestimate(self.model, batches(), theta=self._refresh_theta(), max_batch=self.no_grad_batch)
        else:
            static = swap_out(copy.deepcopy(self.model))
        uncheckpoint_blocks(static)
        for p in static.parameters():
            p.requires_grad_(True)
        self._finalize(static)
        return static.eval()

    def hparams(self) -> dict[str, Any]:
        """What the method ran with, for the artifact's metadata."""
        d: dict[str, Any] = {"method": self.name}
        if self.optimizer is not None:
            d.update(lr=self.lr, optimizer=self.optimizer_name, lr_scaling=self.lr_scaling,
                     lr_reference_batch=REFERENCE_BATCH, loss="mean prediction entropy")
        return d

    # -- for subclasses ------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _finalize(self, static: nn.Module) -> None:
        """Undo, on the static copy, whatever configure() changed that is not a GpreBN layer."""

    def _refresh_theta(self) -> float:
        return 1.0
