"""Keep framework chatter out of the terminal: one module below every capture, imported by each.

``sides.run`` (which starts a side), ``backends.registry`` and the backends' captures all need it; living
here, it imports nothing of the package, so none of them reaches back up to another.
"""
from __future__ import annotations

import os


def quiet_environment() -> None:
    """The environment half of :func:`quiet_frameworks`: cheap (imports nothing), inherited by children.

    Enough for a process that never imports transformers/diffusers itself (``compare``'s parent,
    the MindSpore side); the PyTorch side adds the logging half in :func:`capture`.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_frameworks() -> None:
    """No weight-loading bars or import chatter from transformers/diffusers; denoising bars are ours.

    Call it before transformers or diffusers is imported: transformers reads
    ``TRANSFORMERS_VERBOSITY`` when its logging is first configured, huggingface_hub reads
    ``HF_HUB_DISABLE_PROGRESS_BARS`` at import, and an import-time warning (transformers 5's
    "`CLIPImageProcessor` requires torchvision", printed when diffusers' SDXL pipeline module
    is imported) cannot be unprinted.  The variables are inherited by the side processes.
    Silencing loses nothing that matters: a component's missing / unexpected / mismatched
    weights come back as a LoraParityError from the loading info (``pt_side.check_loading_info``),
    not from these log lines.  A verbosity the user set in the environment is kept.
    """
    user_set = {v for v in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY") if v in os.environ}
    quiet_environment()
    try:
        from transformers.utils import logging as tlog

        if "TRANSFORMERS_VERBOSITY" not in user_set:
            tlog.set_verbosity_error()
        tlog.disable_progress_bar()  # "Loading weights", "Writing model shards"
    except ImportError:
        pass
    try:
        from diffusers.utils import logging as dlog

        if "DIFFUSERS_VERBOSITY" not in user_set:
            dlog.set_verbosity_error()
        dlog.disable_progress_bar()  # "Loading pipeline components"; pipelines' own bars are set per call
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
