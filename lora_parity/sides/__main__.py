"""``python -m lora_parity.sides REQUEST_DIR RESULT_DIR``: one side's capture, the child process of ``compare``.

A module of its own so that :mod:`.run` is imported once, as itself (a test may wrap
``run.capture`` before this runs).
"""
import sys

from lora_parity.sides.run import main, quiet_environment

quiet_environment()
sys.exit(main())
