"""`gprebn`: the forward pass normalizes with dataset-level statistics (a running target estimate mixed
with the source statistics), the backward pass is training BN's, scaled by sigma_B / sigma; gamma and beta
minimize the mean prediction entropy, one step per batch, with predictions from the same forward pass.
After adaptation the model *is* an inference-mode BN model (see layer.py for the maths). It is `adabn`'s
statistics plus the entropy step on the affine parameters.

Freeze: "refresh" (default) re-estimates the statistics with a final pass over the calibration data under
the final gamma/beta, because the cumulative estimate was gathered while gamma/beta moved and is stale for
the later layers; "direct" ships the running estimate as it is."""

from __future__ import annotations

from typing import ClassVar

from gprebn_edge.methods.adabn import AdaBN
from gprebn_edge.methods.layer import gprebn_layers

__all__ = ["GpreBN"]


class GpreBN(AdaBN):
    name: ClassVar[str] = "gprebn"
    freeze_modes: ClassVar[tuple[str, ...]] = ("refresh", "direct")

    def configure(self) -> None:
        super().configure()
        for _, layer in gprebn_layers(self.model):
            layer.weight.requires_grad_(True)
            layer.bias.requires_grad_(True)
