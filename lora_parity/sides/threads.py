"""How many CPU threads a side's framework may use.

Why: torch and MindSpore each size their CPU thread pools to the whole machine.  Where several sides run at
once (the suite's pytest-xdist workers, each starting its own sides), every one of them spreads over every
core, and the cores spend their time switching between spinning threads: measured on this 2-core machine,
474 million involuntary context switches in one parallel suite run.  ``$LORA_PARITY_THREADS`` caps both
frameworks' intra-op pools in each side process (the suite sets it to cores / workers); unset, each
framework keeps its own default, as a single comparison on a machine of its own wants.
"""
from __future__ import annotations

import os

THREADS_ENV = "LORA_PARITY_THREADS"


def thread_limit() -> int | None:
    """The cap from ``$LORA_PARITY_THREADS``, or None (framework defaults)."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        from lora_parity.errors import LoraParityError

        raise LoraParityError(f"${THREADS_ENV} must be a whole number of threads, not {raw!r}") from None
    if value < 1:
        from lora_parity.errors import LoraParityError

        raise LoraParityError(f"${THREADS_ENV} must be at least 1, not {value}")
    return value


def limit_torch_threads() -> int | None:
    """Apply the cap to torch in this process (before its first op); the cap applied, or None."""
    n = thread_limit()
    if n is not None:
        import torch

        torch.set_num_threads(n)
    return n


def limit_mindspore_threads() -> int | None:
    """Apply the cap to MindSpore's CPU kernels in this process (before its first op); the cap, or None."""
    n = thread_limit()
    if n is not None:
        import mindspore as ms

        try:
            if hasattr(ms, "device_context"):
                ms.device_context.cpu.op_tuning.threads_num(n)
            else:  # pragma: no cover - MindSpore before 2.5
                ms.set_context(runtime_num_threads=n)
        except RuntimeError:  # set once per process ("can not be set repeatedly"): the first setting holds
            pass
    return n


def cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
