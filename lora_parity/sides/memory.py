"""Peak resident memory of this process, and giving freed memory back to the OS.

Linux keeps a high-water mark of resident memory (``VmHWM``); writing ``5`` to
``/proc/self/clear_refs`` resets it, so a side can report its own peak even when it
runs in a process that did other work before.  Where /proc is missing the peak is
``ru_maxrss`` (never reset) and the report says so.
"""
from __future__ import annotations

import ctypes
import gc
import resource
import sys


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident memory now (0 where /proc is missing)."""
    return _status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def free_memory() -> None:
    """Collect garbage and hand free heap pages back (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
