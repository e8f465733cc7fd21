"""Dataset-level BatchNorm statistics: a running estimate of the target mean and variance, mixed with the
frozen source statistics (docs/method.md).

The variance update counts the spread of the batch means around the running mean (law of total variance):
a plain EMA of per-batch variances converges to the *within-batch* variance, which at batch 1 is the
within-image variance and far too small for the deeper layers. With it, a cumulative estimate is the exact
pooled mean and variance of every activation seen, whatever the batch size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from gprebn_edge.errors import GprebnError

__all__ = ["StatsConfig", "batch_stats", "update_running", "mix"]

REFERENCE_BATCH = 64


@dataclass(frozen=True)
class StatsConfig:
    """How the dataset-level statistics are estimated.

    momentum: None for a cumulative average (each image weighs 1/t), else an EMA rate per 64 images,
        converted per batch as 1 - (1 - momentum) ** (batch / 64) so the horizon in images does not
        depend on the batch size.
    theta: weight of the target estimate against the frozen source statistics (1 = target only).
    init: "source" starts the target estimate from the source statistics (only matters for an EMA; a
        cumulative average replaces it with the first batch), "first" from the first batch.
    order: "before" updates the estimate with the current batch before normalizing it, so the batch is
        normalized with statistics that already include it; "after" normalizes with the estimate so far.
    """

    momentum: float | None = None
    theta: float = 1.0
    init: str = "first"
    order: str = "before"

    def __post_init__(self) -> None:
        if self.momentum is not None and not 0.0 < self.momentum <= 1.0:
            raise GprebnError(f"--momentum must be in (0, 1] or 'cumulative', got {self.momentum}")
        if not 0.0 <= self.theta <= 1.0:
            raise GprebnError(f"--theta must be in [0, 1], got {self.theta}")
        if self.init not in ("source", "first"):
            raise GprebnError(f"--stats-init must be 'source' or 'first', got {self.init!r}")
        if self.order not in ("before", "after"):
            raise GprebnError(f"--stats-order must be 'before' or 'after', got {self.order!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["momentum"] = "cumulative" if self.momentum is None else self.momentum
        return d

    def rate(self, batch: int, seen: int) -> float:
        """Weight of a batch of `batch` items after `seen` items (seen == 0 on the first batch)."""
        if self.momentum is None or (seen == 0 and self.init == "first"):
            return batch / (seen + batch) if seen > 0 else 1.0
        return 1.0 - (1.0 - self.momentum) ** (batch / REFERENCE_BATCH)


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of an (N, C, ...) activation, one fused pass."""
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    return mean, var


@torch.no_grad()
def update_running(mean: torch.Tensor, var: torch.Tensor, batch_mean: torch.Tensor, batch_var: torch.Tensor,
                   rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixture of the running estimate (weight 1 - rate) and the batch (weight rate), as new tensors.

    var' = (1 - r) var + r var_B + r (1 - r) (mean_B - mean)^2   (law of total variance)
    """
    delta = batch_mean - mean
    new_var = torch.mul(var, 1.0 - rate).add_(batch_var, alpha=rate).addcmul_(delta, delta, value=rate * (1.0 - rate))
    return torch.add(mean, delta, alpha=rate), new_var


def mix(target: torch.Tensor, source: torch.Tensor, theta: float) -> torch.Tensor:
    """theta * target + (1 - theta) * source."""
    if theta == 1.0:
        return target
    return torch.lerp(source, target, theta)
