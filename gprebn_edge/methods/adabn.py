"""`adabn` (Li et al. 2016): replace the source BN statistics by the target data's, with no gradient.

Each batch updates the dataset-level estimate (cumulative by default, with the between-batch spread of
means counted, see stats.py) and is normalized with it, so it works at any batch size, batch 1 included,
and the result folds into a static model like GpreBN's."""

from __future__ import annotations

from typing import Any, ClassVar

from gprebn_edge.methods.base import Adapter
from gprebn_edge.methods.layer import swap_in

__all__ = ["AdaBN"]


class AdaBN(Adapter):
    name: ClassVar[str] = "adabn"
    freeze_modes: ClassVar[tuple[str, ...]] = ("direct", "refresh")

    def configure(self) -> None:
        swap_in(self.model, self.stats)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "stats": self.stats.to_dict()}

    def _refresh_theta(self) -> float:
        return self.stats.theta
