"""The error every backend raises when it cannot load or run a variant's graph (backends, ov)."""

from __future__ import annotations


class BackendError(RuntimeError):
    """A backend could not load or run a variant's graph; one line naming the file."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), at most 300 characters."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]
