"""The MindSpore backend's registry entry: availability and the dtypes it can run here.

The capture itself (SGM cells filled tensor by tensor from the base, MindONE LoRA unmerged
or merged, one component at a time, every block recorded under its SGM name) is
:func:`lora_parity.backends.port.capture.capture_ms`, which ``compare`` and ``infer`` run.
"""
from __future__ import annotations

# MindSpore 2.10's CPU MatMul has no bfloat16 kernel ("Select CPU operator[MatMul] fail")
CPU_DTYPES = ("F32", "F16")


class MindSporeBackend:
    name = "mindspore"
    CPU_DTYPES = CPU_DTYPES

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            import mindspore  # noqa: F401
        except ImportError:
            return False, "mindspore is not installed"
        return True, ""

    @classmethod
    def supports(cls, dtype: str, device: str | None = None) -> tuple[bool, str]:
        import mindspore as ms

        device = device or ms.get_context("device_target")
        if device == "CPU" and dtype not in cls.CPU_DTYPES:
            return False, f"MindSpore {ms.__version__} on CPU has no {dtype} MatMul kernel"
        return True, ""
