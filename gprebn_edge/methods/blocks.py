"""Gradient checkpointing of a model's blocks, for adaptation steps that must fit a memory budget.

A *block* is a child of an `nn.Sequential` or `nn.ModuleList` that holds a BatchNorm and is not a container
itself (a ResNet's BasicBlock, an EfficientNet's MBConvBlock); the outermost such modules are taken. A
checkpointed block keeps only its input for the backward and runs its forward again during the backward
(torch.utils.checkpoint, non-reentrant), so a step holds the block boundaries plus one block's activations
instead of every activation.

A GpreBN layer updates its running statistics in its forward. The recomputation must not update them a
second time, and must normalize with exactly the statistics the first forward used: `recomputing()` tells
the layer which forward it is in (layer.py keeps what the first forward used).
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = ["find_blocks", "checkpoint_blocks", "uncheckpoint_blocks", "recomputing"]

_state = threading.local()


def recomputing() -> bool:
    """True while a checkpointed block runs its forward again inside the backward."""
    return bool(getattr(_state, "recomputing", False))


@contextlib.contextmanager
def _recompute_context() -> Iterator[None]:
    previous = recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = previous


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _recompute_context()


def _has_bn(module: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) or hasattr(m, "source_mean") for m in module.modules())


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the outermost blocks: children of Sequential/ModuleList holding a BatchNorm."""
    found: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        sequence = isinstance(module, (nn.Sequential, nn.ModuleList))
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if sequence and not isinstance(child, (nn.Sequential, nn.ModuleList)) and _has_bn(child) \
                    and any(True for _ in child.children()):
                found.append((full, child))
            else:
                walk(child, full + ".")

    walk(model, "")
    return found


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    return checkpoint(forward, self, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


def checkpoint_blocks(model: nn.Module) -> int:
    """In place: checkpoint every block of `model` in gradient mode. Returns the number of blocks. The
    wrapper is a bound method, so a deep copy of the model checkpoints its own blocks."""
    blocks = find_blocks(model)
    for _, block in blocks:
        block.forward = types.MethodType(_checkpointed_forward, block)  # type: ignore[method-assign]
    return len(blocks)


def uncheckpoint_blocks(model: nn.Module) -> None:
    """Undo checkpoint_blocks."""
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), types.MethodType) and \
                m.__dict__["forward"].__func__ is _checkpointed_forward:
            del m.forward
