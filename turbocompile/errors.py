"""One exception hierarchy for everything turbocompile raises on purpose.

Every message names the offending object and, where there is a fixed set of valid
choices, lists them. The CLI turns any :class:`TurboCompileError` into a one-line
message and exit code 2; anything else is an internal error (exit code 1).
"""

from __future__ import annotations

__all__ = [
    "TurboCompileError",
    "RecipeError",
    "PassError",
    "PipelineError",
    "CheckpointError",
    "ArtifactError",
    "KernelUnavailableError",
    "ModelConfigError",
    "InputError",
]


class TurboCompileError(Exception):
    """Base class of all deliberate turbocompile errors (user-facing, one line)."""


class RecipeError(TurboCompileError):
    """A recipe YAML is malformed: names the YAML path and the valid choices."""


class PipelineError(TurboCompileError):
    """Passes cannot be ordered: a cycle, or a prerequisite no pass provides."""


class PassError(TurboCompileError):
    """A pass failed; carries the pass name and the passes that ran before it."""

    def __init__(self, pass_name: str, previous: list[str] | tuple[str, ...], message: str):
        self.pass_name = pass_name
        self.previous = list(previous)
        after = ", ".join(self.previous) if self.previous else "nothing"
        super().__init__(f"pass '{pass_name}' failed (after: {after}): {message}")


class CheckpointError(TurboCompileError):
    """A checkpoint cannot be read or does not match the model (names the keys)."""


class ArtifactError(TurboCompileError):
    """An artifact is missing, edited, truncated or of an unsupported format version."""


class KernelUnavailableError(TurboCompileError):
    """A backend was requested explicitly but cannot run here (no GPU, no Triton, ...)."""


class ModelConfigError(TurboCompileError):
    """An unknown model name or an inconsistent model configuration."""


class InputError(TurboCompileError):
    """Inputs given to a compiled module do not match its call contract."""
