"""Faults planted inside a capture child process, for the fault tests of the default path.

``compare`` runs each side as ``python -m lora_parity.sides``; a test puts this folder
on ``PYTHONPATH`` and names a fault in ``LORA_PARITY_TEST_FAULT``, so the child patches
the MindSpore port just before its capture.  Nothing here is imported by the library.
"""
import os

_FAULT = os.environ.get("LORA_PARITY_TEST_FAULT")

if _FAULT:
    from lora_parity.sides import run as _run

    _capture = _run.capture

    def _faulty_capture(req):
        if req.side == "ms":
            from child_fault_patches import apply

            apply(_FAULT)
        return _capture(req)

    _run.capture = _faulty_capture
