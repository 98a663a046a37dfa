"""The test suite that ships with lora-parity and runs on the user's own files.

``pytest --pyargs lora_parity -m conversion --lora-ckpt ~/my_lora.ckpt`` from any folder:

* :mod:`.plugin` is the pytest plugin (``pytest11`` entry point ``lora_parity``): the suite's
  options, markers, Hypothesis profiles and option fixtures, hooks only.
* ``test_user_lora.py``: every check of a real LoRA that needs no base weights, one named test
  each (skipped without ``--lora-ckpt``); with ``--sdxl-base SPEC`` also the parity and image layers.
* ``test_ascend.py``: the ``ascend`` layer (MindSpore on the NPU).
* :mod:`.checks`: what those tests compute (file inspection, coverage, the hollow pipeline).
"""
