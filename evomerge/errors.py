"""Errors a user can act on: each message names what was wrong and what is allowed."""


class EvomergeError(Exception):
    """Base class: the CLI prints these as one clean line instead of a traceback."""


class SpecError(EvomergeError):
    """A search spec failed validation; `path` is the dotted field name."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)

    def __reduce__(self) -> tuple:
        """Picklable, so an error raised in a Ray worker reaches the driver intact."""
        return (type(self), (self.path, self.message))


class RunDirError(EvomergeError):
    """A run directory is missing, locked, or does not match what the user asked for."""


class ShapeMismatchError(EvomergeError):
    """Two things that must have the same shape do not; the message names both shapes."""


class EvaluationError(EvomergeError):
    """An evaluator raised or returned something unusable for one candidate."""
