"""`tent` (Wang et al., ICLR 2021): normalize with the test batch's statistics and update the BN affine
parameters (gamma, beta) by minimizing the mean prediction entropy, one step per batch.

Tent's adapted gamma/beta belong with batch statistics; with the stored source statistics they are close
to worthless. Its static export therefore re-estimates the statistics with a final pass over the
calibration data (freeze mode "refresh", the default); "direct" keeps the source statistics."""

from __future__ import annotations

from typing import ClassVar

from torch.nn.modules.batchnorm import _BatchNorm

from gprebn_edge.methods.bn import BatchStatsBN

__all__ = ["Tent"]


class Tent(BatchStatsBN):
    name: ClassVar[str] = "tent"

    def configure(self) -> None:
        super().configure()
        for m in self.model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.requires_grad_(True)
                m.bias.requires_grad_(True)
