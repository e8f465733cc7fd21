"""The project's one exception family; the CLI turns any of them into a one-line message and exit code 1."""

__all__ = ["GprebnError", "InputError", "ModelError", "ArtifactError", "MissingDependencyError"]


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
