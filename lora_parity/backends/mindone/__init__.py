"""Running MindONE's own SDXL code (``mindone.diffusers`` 0.5.0) beside this project's cells.

:mod:`.compat` reroutes the handful of ``mindspore.mint`` ops that MindSpore 2.10 has no
CPU kernel for to ``mindspore.ops``-level equivalents, so MindONE's pipeline, weight
loading and LoRA loader run unchanged on a CPU.  Importing this package imports no
framework; import :mod:`lora_parity.backends.mindone.compat` when MindSpore is wanted.
"""
