"""The project's one exception family; the CLI turns any of them into a one-line message and exit code 1."""

from __future__ import annotations

__all__ = ["GprebnError", "InputError", "ModelError", "ArtifactError", "MissingDependencyError", "EXTRAS",
           "missing_extra"]


class GprebnError(Exception):
    """Base of every error the user can fix; the message says how."""


class InputError(GprebnError):
    """Bad data: unreadable, empty, wrong shape, non-finite."""


class ModelError(GprebnError):
    """A model that cannot be built, loaded or adapted (no BatchNorm, mismatched weights)."""


class ArtifactError(GprebnError):
    """An artifact that is missing, malformed or from an incompatible version."""


class MissingDependencyError(GprebnError):
    """An optional dependency is not installed; the message names the extra."""


# top-level module -> (what it is, the extra that installs it). The serving part (bench, compare and a
# serve-only loop of ONNX files and engines) needs none of them; adapting, exporting and checkpoints do.
EXTRAS = {"torch": ("PyTorch", "adapt"), "safetensors": ("safetensors", "adapt")}


def missing_extra(error: ImportError, command: str | None = None) -> MissingDependencyError | None:
    """The one-line error for an import that failed because an extra is not installed (None when `error`
    is about something else): it names what is missing and the extra to install."""
    name = getattr(error, "name", None)
    if not isinstance(error, ModuleNotFoundError) or not name or name.split(".")[0] not in EXTRAS:
        return None
    what, extra = EXTRAS[name.split(".")[0]]
    who = f"gprebn-edge {command}" if command else "this command"
    return MissingDependencyError(f"{who} needs {what}, which this install lacks: "
                                  f"pip install 'gprebn-edge[{extra}]'")
