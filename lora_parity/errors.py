"""One exception type for every user-facing failure.

The CLI turns a :class:`LoraParityError` into a single line on stderr and a
non-zero exit, so every message must name the file and, where there is one,
the key that is wrong.  Anything else escaping is a bug and keeps its traceback.
"""
from __future__ import annotations

from pathlib import Path


class LoraParityError(Exception):
    """A bad input or argument, reported as one line naming file and key."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None, key: str | None = None):
        self.path = None if path is None else str(path)
        self.key = key
        self.detail = message
        where = []
        if self.path is not None:
            where.append(self.path)
        if key is not None:
            where.append(f"key '{key}'")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class CheckpointFormatError(LoraParityError):
    """The file is not a readable checkpoint (truncated, corrupt, encrypted, wrong type)."""


class KeyMapError(LoraParityError):
    """Names or shapes in a LoRA do not fit the UNet / text-encoder layout."""


class OutputExistsError(LoraParityError):
    """Refuse to overwrite an existing output without ``--force``."""
