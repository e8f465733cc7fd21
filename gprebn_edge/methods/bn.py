"""`bn`: normalize each test batch with its own statistics (Nado et al. 2020, "prediction-time BN"); no
parameter changes. It cannot be used at batch 1 in deployment, so its static export re-estimates the
dataset statistics on the calibration data (freeze mode "refresh", which then equals `adabn`)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gprebn_edge.methods.base import Adapter

__all__ = ["BatchStatsBN"]


class BatchStatsBN(Adapter):
    name: ClassVar[str] = "bn"
    freeze_modes: ClassVar[tuple[str, ...]] = ("refresh", "direct")

    def configure(self) -> None:
        """BN layers in training mode with momentum 0: they normalize with the batch's statistics and leave
        the stored (source) running statistics untouched. Other layers (dropout) stay in eval mode."""
        self.original_momentum: dict[str, float | None] = {}
        for name, m in self.model.named_modules():
            if isinstance(m, _BatchNorm):
                self.original_momentum[name] = m.momentum
                m.train()
                m.momentum = 0.0

    def _finalize(self, static: nn.Module) -> None:
        for name, m in static.named_modules():
            if isinstance(m, _BatchNorm):
                m.momentum = self.original_momentum[name]
