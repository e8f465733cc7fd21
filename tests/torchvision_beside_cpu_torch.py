"""torchvision's models beside a torch its C++ operators were not built for (tests only).

The torchvision wheel on PyPI for this torch is a CUDA build; beside the CPU torch of the dev install its
compiled operators do not load, and `import torchvision` fails with "operator torchvision::nms does not
exist" (its Python code registers fake and autograd kernels for operators nobody defined). The classifiers in
torchvision.models are plain torch modules and need none of those operators, so defining the two schemas
that the import trips over makes them usable. The product itself never does this: it tells the user to
install a matching pair (gprebn_edge/models/spec.py).

tests/conftest.py calls `usable_torchvision()` once when pytest starts, so every test of a session sees the
same torchvision whatever the order or selection of tests; tests call `torchvision_or_skip()`. A subprocess
does not inherit the schemas: that is how the product's own message is tested."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest
import torch

__all__ = ["usable_torchvision", "torchvision_or_skip"]

MISSING_OPERATOR = "operator torchvision::nms does not exist"
_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library: torch.library.Library | None = None  # kept alive: the schemas live as long as this object


def usable_torchvision() -> ModuleType | None:
    """torchvision, imported with the two schemas defined first where its operators do not load; None where
    it is not installed. Any other import failure is raised."""
    global _library
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision
        return torchvision
    except RuntimeError as e:
        if MISSING_OPERATOR not in str(e) or _library is not None:
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the failed import's half-initialised submodules
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    import torchvision
    return torchvision


def torchvision_or_skip() -> ModuleType:
    tv = usable_torchvision()
    if tv is None:
        pytest.skip("torchvision is not installed (make installs it: pip install --no-deps torchvision)")
    return tv
