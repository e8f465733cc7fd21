"""Adaptation methods behind one interface (see base.Adapter)."""

from __future__ import annotations

from typing import Any

from torch import nn

from gprebn_edge.errors import GprebnError
from gprebn_edge.methods.adabn import AdaBN
from gprebn_edge.methods.base import Adapter, entropy, reestimate
from gprebn_edge.methods.bn import BatchStatsBN
from gprebn_edge.methods.gprebn import GpreBN
from gprebn_edge.methods.source import Source
from gprebn_edge.methods.stats import StatsConfig
from gprebn_edge.methods.tent import Tent

__all__ = ["METHODS", "Adapter", "StatsConfig", "make_adapter", "entropy", "reestimate"]

METHODS: dict[str, type[Adapter]] = {
    cls.name: cls for cls in (Source, BatchStatsBN, AdaBN, Tent, GpreBN)
}


def make_adapter(method: str, model: nn.Module, **hparams: Any) -> Adapter:
    """Build the adapter `method` (one of METHODS) on a copy of `model`."""
    if method not in METHODS:
        raise GprebnError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return METHODS[method](model, **hparams)
