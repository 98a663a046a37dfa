"""Atomic file output: write a temp file beside the target, then ``os.replace``.

Readers of ``path`` see either the old file or the complete new one, never a
partial write.  If the body of the ``with`` block raises, the temp file is
removed and the target is left untouched.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

_UMASK: int | None = None


def _umask() -> int:
    """Process umask (read once; there is no way to query it without setting it)."""
    global _UMASK
    if _UMASK is None:
        current = os.umask(0o022)
        os.umask(current)
        _UMASK = current
    return _UMASK


@contextmanager
def atomic_output(path: str | os.PathLike, *, durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file object; on success it atomically becomes ``path``.

    ``durable=True`` fsyncs the data before the rename so a crash cannot leave
    an empty or partial file under the final name.  The new file gets the usual
    ``0o666 & ~umask`` permissions (``mkstemp`` alone would give ``0o600``).
    """
    target = Path(os.fspath(path))
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        except (AttributeError, OSError):  # pragma: no cover - non-POSIX
            pass
        with os.fdopen(fd, "wb") as handle:
            fd = -1  # owned by ``handle`` now
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        if fd != -1:
            os.close(fd)
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
