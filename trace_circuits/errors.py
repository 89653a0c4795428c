"""One error type for every mistake a user can make; its message is one line that names the fix."""

from __future__ import annotations


class TraceCircuitsError(Exception):
    """A user-facing error. ``str(err)`` is a single line that says what is wrong and how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def require(condition: bool, message: str) -> None:
    """Raise :class:`TraceCircuitsError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise TraceCircuitsError(message)


class FormWarning(UserWarning):
    """Stage 1: the two prompt sets differ in form far more than matched pairs (their raw divergence measures form)."""
