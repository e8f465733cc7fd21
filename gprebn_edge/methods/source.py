"""`source`: no adaptation; the baseline every other method must beat."""

from __future__ import annotations

from typing import ClassVar

from gprebn_edge.methods.base import Adapter

__all__ = ["Source"]


class Source(Adapter):
    """Predicts with the source model in eval mode and changes nothing."""

    name: ClassVar[str] = "source"
