"""Adapt within a memory budget: choose the micro-batch, and gradient checkpointing of blocks where that is
still not enough, so that the process's peak memory stays under `--max-memory` (docs/budget.md).

The estimate is a fixed part plus a part per image:

- fixed: the process as it is when planning (interpreter, torch, the loaded model), the copies of the model
  that adaptation makes (the adapter's, its reset snapshot, the frozen result), images the caller holds
  beside the plan (the loop's buffer still to fill) and one logical batch of decoded images;
- per image, measured once on the model at a probe batch of 2 (`footprint`): for a gradient step, the
  tensors autograd saves for the backward (counted by a saved-tensors hook, parameters excluded) plus
  transient activations and gradients; for a forward without gradients, the largest input + output of
  one layer plus one activation kept for a residual. With checkpointing, only the blocks' inputs, the
  tensors saved outside the blocks and the largest block's own tensors are held.

Both parts are multiplied by a safety factor for the allocator's slack, set by measurement
(benchmarks/adapt_cost.py checks measured peaks against the budget).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from gprebn_edge.errors import GprebnError
from gprebn_edge.runtime.environment import resident_memory
from gprebn_edge.validate import flag_number

if TYPE_CHECKING:  # torch is imported where a plan is made: sizes and BudgetError serve torch-free callers
    from torch import nn

    from gprebn_edge.methods import Adapter

__all__ = ["Footprint", "MemoryPlan", "BudgetError", "footprint", "plan_memory", "parse_size", "format_size",
           "current_rss", "release_memory", "GRADIENT_METHODS"]

GRADIENT_METHODS = ("tent", "gprebn")
PROBE_BATCH = 2
SLACK = 1.5           # allocator slack and what the estimate leaves out, on the per-image part (measured:
                      # 1.3 left EfficientNet-Lite0 at 2GB 3.6 % over its budget)
MODEL_COPIES = 3      # alive at once in the refresh: the adapter's copy, its reset snapshot, the frozen copy
BATCH_COPIES = 3      # a logical batch: float images, uint8 raw, and the list they were stacked from

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


class BudgetError(GprebnError):
    """The budget cannot hold even one image of the method's step."""


def parse_size(text: str, flag: str = "--max-memory") -> int:
    """'2GB' -> 2_000_000_000, '1.5GiB', '800MB', '512M'; SI units (GB = 10^9 bytes), binary with 'iB'."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise GprebnError(f"{flag} must be a size such as 2GB, 1.5GiB or 800MB, got {text!r}")
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise GprebnError(f"{flag} must be a positive size, got {text!r}")
    return int(value)


def format_size(n: float) -> str:
    """1_234_567_890 -> '1.23 GB' (SI, as parse_size reads it back)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def current_rss() -> int:
    """This process's resident set size now, in bytes (0 where it cannot be read)."""
    return resident_memory() or 0


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_memory() -> None:
    """Hand the heap's free memory back to the operating system (glibc's malloc_trim; elsewhere nothing).

    Between passes that allocate differently (a step's saved activations, then a wide no-gradient batch),
    glibc keeps freed blocks it cannot reuse for the next pattern, and the process's peak becomes the sum of
    both. An action, not a setting: nothing process-wide changes."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@dataclass(frozen=True)
class Footprint:
    """Bytes per image of a model's adaptation step and of its plain forward, measured at a probe batch."""

    saved: int                 # tensors kept for the backward (0 for methods without gradients)
    saved_checkpointed: int    # the same with blocks checkpointed (= saved when there are no blocks)
    largest_activation: int    # the largest output of one module
    largest_io: int            # the largest input + output of one leaf module
    image: int                 # one preprocessed input image (float32)
    model: int                 # parameters and buffers of one copy of the model (not per image)
    blocks: int                # blocks that checkpointing can wrap

    def step(self, gradient: bool, checkpoint: bool = False) -> int:
        """Bytes per image of one step (a gradient step, or a forward without gradients)."""
        if not gradient:  # one layer's input and output, a residual kept alive, and the next output
            return self.largest_io + 2 * self.largest_activation + self.image
        saved = self.saved_checkpointed if checkpoint else self.saved
        return saved + 3 * self.largest_activation + self.image


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if hasattr(t, "element_size") and hasattr(t, "numel") else 0


def footprint(model: nn.Module, input_shape: tuple[int, ...], method: str = "gprebn", **hparams: Any) -> Footprint:
    """Measure `method`'s step on a copy of `model` at batch PROBE_BATCH (random inputs; the caller's model,
    RNG state and autograd settings are left as they were)."""
    import torch

    from gprebn_edge.methods import make_adapter
    from gprebn_edge.methods.blocks import find_blocks

    adapter = make_adapter(method, model, **hparams)
    net = adapter.model
    param_ptrs = {p.untyped_storage().data_ptr() for p in net.parameters()}
    param_ptrs |= {b.untyped_storage().data_ptr() for b in net.buffers()}
    blocks = find_blocks(net)
    block_of = {id(b): i for i, (_, b) in enumerate(blocks)}
    inside: list[int] = []                       # the block whose forward runs now (outermost)
    saved_in = [0] * len(blocks)
    block_inputs = [0] * len(blocks)
    seen: dict[int, int] = {}                    # storage -> bytes, each storage counted once
    outside = 0
    largest_act = largest_io = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal outside
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
            if inside:
                saved_in[inside[0]] += seen[ptr]
            else:
                outside += seen[ptr]
        return t

    def pre(module: nn.Module, args: tuple) -> None:
        i = block_of[id(module)]
        if not inside:
            block_inputs[i] += sum(_nbytes(a) for a in args)
        inside.append(i)

    def post(module: nn.Module, args: tuple, out: Any) -> None:
        inside.pop()

    def leaf(module: nn.Module, args: tuple, out: Any) -> None:
        nonlocal largest_act, largest_io
        o = _nbytes(out)
        largest_act = max(largest_act, o)
        largest_io = max(largest_io, o + sum(_nbytes(a) for a in args))

    handles = [m.register_forward_hook(leaf) for m in net.modules() if not any(True for _ in m.children())]
    for _, b in blocks:
        handles += [b.register_forward_pre_hook(pre), b.register_forward_hook(post)]
    gradient = adapter.optimizer is not None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            x = torch.randn(PROBE_BATCH, *input_shape)
        if gradient:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                adapter._forward(x)
        else:
            with torch.inference_mode():
                adapter._forward(x)
    finally:
        for h in handles:
            h.remove()
    saved = outside + sum(saved_in)
    checkpointed = outside + sum(block_inputs) + max(saved_in, default=0) if blocks else saved
    model_bytes = sum(_nbytes(t) for t in model.state_dict().values())
    per = PROBE_BATCH
    return Footprint(saved=saved // per, saved_checkpointed=checkpointed // per, largest_activation=largest_act // per,
                     largest_io=largest_io // per, image=_nbytes(x) // per, model=model_bytes, blocks=len(blocks))


@dataclass(frozen=True)
class MemoryPlan:
    """How adaptation runs within `budget`: images per forward(+backward) of a step (`micro_batch`) and per
    forward without gradients (`no_grad_batch`: refresh, health check), and whether blocks are checkpointed."""

    budget: int
    method: str
    batch_size: int
    micro_batch: int
    no_grad_batch: int
    checkpoint: bool
    estimated_peak: int
    fixed: int
    per_image: int
    footprint: Footprint

    def apply(self, adapter: Adapter) -> Adapter:
        """Make `adapter` run within the plan (micro-batches, checkpointing or not, refresh batch). Returns it."""
        from gprebn_edge.methods.blocks import uncheckpoint_blocks

        adapter.micro_batch = self.micro_batch if self.micro_batch < self.batch_size else None
        adapter.no_grad_batch = self.no_grad_batch
        if self.checkpoint:
            adapter.checkpoint_blocks()
        else:
            uncheckpoint_blocks(adapter.model)
        return adapter

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["budget_text"] = format_size(self.budget)
        d["estimated_peak_text"] = format_size(self.estimated_peak)
        return d

    def describe(self) -> str:
        parts = [f"micro-batch {self.micro_batch} of {self.batch_size}"]
        if self.checkpoint:
            parts.append(f"{self.footprint.blocks} blocks checkpointed")
        parts.append(f"no-gradient passes at {self.no_grad_batch}")
        return (f"--max-memory {format_size(self.budget)}: " + ", ".join(parts)
                + f" (estimated peak {format_size(self.estimated_peak)})")


def plan_memory(model: nn.Module, input_shape: tuple[int, ...], method: str, batch_size: int, budget_bytes: int, *,
                refresh_batch: int | None = None, held_images: int = 0, baseline_bytes: int | None = None,
                reserve_bytes: int = 0, measured: Footprint | None = None, **hparams: Any) -> MemoryPlan:
    """The largest micro-batch (up to `batch_size`) whose estimated peak fits `budget_bytes`; checkpointing
    of blocks when even batch 1 does not fit without it; BudgetError (one line) when nothing fits.

    `baseline_bytes`: the process's memory before adaptation (default: its resident size now, so call this
    with the model loaded). The passes without gradients run at no more than min(batch_size, refresh_batch).
    `reserve_bytes`: what the caller will hold beside the plan that the plan cannot see (the loop: its
    onnxruntime sessions and the export of each candidate), added to the fixed part. `measured`: the
    model's footprint from an earlier plan (it does not change), instead of measuring it again."""
    flag_number(batch_size, "--batch-size", low=1)
    fp = measured or footprint(model, tuple(input_shape), method, **hparams)
    release_memory()  # what the measurement (or the caller's last pass) freed, before the process's size is read
    gradient = method in GRADIENT_METHODS
    base = current_rss() if baseline_bytes is None else baseline_bytes
    images = held_images + BATCH_COPIES * batch_size
    fixed = int(base + reserve_bytes + MODEL_COPIES * fp.model + images * fp.image)

    def largest(per_image: int, cap: int) -> int:
        return max(0, min(cap, int((budget_bytes - fixed) / (SLACK * per_image))))

    no_grad_cap = min(batch_size, refresh_batch or batch_size)
    no_grad = largest(fp.step(False), no_grad_cap)
    checkpoint = False
    micro = largest(fp.step(gradient), batch_size)
    if micro < 1 and gradient and fp.blocks:
        checkpoint = True
        micro = largest(fp.step(gradient, checkpoint=True), batch_size)
    if micro < 1 or no_grad < 1:
        need = fixed + SLACK * max(fp.step(gradient, checkpoint=gradient and fp.blocks > 0), fp.step(False))
        how = " with its blocks checkpointed" if gradient and fp.blocks else ""
        raise BudgetError(f"--max-memory {format_size(budget_bytes)} is too small for {method}: one image needs "
                          f"about {format_size(need)}{how} (this process already holds {format_size(base)}); "
                          f"give at least {format_size(math.ceil(need / 1e7) * 1e7)}")
    per_image = fp.step(gradient, checkpoint)
    peak = fixed + SLACK * max(micro * per_image, no_grad * fp.step(False))
    return MemoryPlan(budget=budget_bytes, method=method, batch_size=batch_size, micro_batch=micro,
                      no_grad_batch=no_grad, checkpoint=checkpoint, estimated_peak=int(peak), fixed=fixed,
                      per_image=per_image, footprint=fp)
