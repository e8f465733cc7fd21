"""What the layers above hand the runtime, which imports nothing of the adapt and export stages
(docs/design.md): the adapt stage's checkpoint reader and the export stage's fold. Each imports its stage,
and so torch, only when it is called, so that an ONNX run never imports torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gprebn_edge.consent import CodeConsent

__all__ = ["CHECKPOINTS", "Checkpoints", "fold_as_exported"]


class Checkpoints:
    """The adapt stage's checkpoints as the runtime reads them (runtime.base.CheckpointReader)."""

    def metadata(self, path: Path) -> dict[str, Any]:
        from gprebn_edge.checkpoint import load_checkpoint  # without torch, the CLI names the extra to install

        return load_checkpoint(path)[1]

    def rebuild(self, path: Path, which: str, consent: CodeConsent | None) -> tuple[Any, dict[str, Any]]:
        from gprebn_edge.checkpoint import rebuild_model

        return rebuild_model(path, which, consent=consent)


CHECKPOINTS = Checkpoints()


def fold_as_exported(model: Any, example: Any) -> tuple[Any, Any]:
    """A checkpoint run with the torch backend is folded as its export is (TorchRunner's `prepare`)."""
    from gprebn_edge.export.fold import fold_batchnorm

    return fold_batchnorm(model, example)
