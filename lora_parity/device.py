"""Where MindSpore runs: device detection and the settings a parity run pins and records."""
from __future__ import annotations

import glob
import os

DEVICES = ("Ascend", "CPU", "GPU")
# Ascend: keep every op in the dtype it was given (no silent fp16 downcast of fp32 matmuls)
ASCEND_PRECISION_MODE = "must_keep_origin_dtype"


def ascend_present() -> tuple[bool, str]:
    """An Ascend NPU is visible (driver device files) and mindspore is installed."""
    try:
        import mindspore  # noqa: F401
    except ImportError:
        return False, "mindspore is not installed"
    if not glob.glob("/dev/davinci[0-9]*"):
        return False, "no Ascend NPU on this machine (no /dev/davinci*); --ms-device CPU runs these tests on CPU"
    return True, ""


def use_device(device: str) -> dict:
    """Point MindSpore at ``device`` and return the settings to record with the results."""
    import mindspore as ms

    if device not in DEVICES:
        raise ValueError(f"unknown MindSpore device {device!r}")
    current = ms.get_context("device_target")
    if current != device:  # once kernels ran, MindSpore refuses to switch devices in this process
        try:
            if hasattr(ms, "set_device"):  # 2.5+: set_context(device_target=) is deprecated
                ms.set_device(device)
            else:  # pragma: no cover - older MindSpore
                ms.set_context(device_target=device)
        except RuntimeError:
            from lora_parity.errors import LoraParityError

            raise LoraParityError(f"MindSpore already runs on {current} in this process; "
                                  f"start a new process for --ms-device {device}") from None
    settings = {"device_target": device, "mode": "PyNative", "mindspore": ms.__version__}
    from lora_parity.sides.threads import limit_mindspore_threads

    if device == "CPU":
        if (threads := limit_mindspore_threads()) is not None:
            settings["cpu_threads"] = threads
        # PyNative hands each op to a dispatch thread and returns; on CPU, where the kernel runs on the host
        # anyway, that handoff costs more than the small ops of a capture: a tiny mindone compare took
        # 10.2 s asynchronous and 3.5 s synchronous, every metric of the report bitwise the same
        ms.set_context(pynative_synchronize=True)
        settings["pynative_synchronize"] = True
    if device == "Ascend":
        ms.set_context(ascend_config={"precision_mode": ASCEND_PRECISION_MODE})
        settings["precision_mode"] = ASCEND_PRECISION_MODE
    settings["device_id"] = int(os.environ.get("DEVICE_ID", "0"))
    return settings
