"""Token ids from a pipeline folder's own CLIP tokenizers, for a side that runs alone.

Padded to ``model_max_length`` as ``encode_prompt`` pads them; a refiner folder has only
``tokenizer_2``.  ``negative`` adds the ids of the empty negative prompt, which the
refiner (``force_zeros_for_empty_prompt`` false) encodes instead of zeroing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def token_ids(pipeline_dir: str | Path, prompt: str, *, negative: bool = False) -> dict[str, np.ndarray]:
    from transformers import CLIPTokenizer

    out = {}
    for sub, key in (("tokenizer", "input_ids"), ("tokenizer_2", "input_ids_2")):
        folder = Path(pipeline_dir) / sub
        if not folder.is_dir():
            continue
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)

        def enc(text):
            return tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="np").input_ids.astype(np.int64)

        out[key] = enc(prompt)
        if negative and key == "input_ids_2":
            out["negative_input_ids_2"] = enc("")
    return out


def clip_tokenizers(pipeline_dir: str | Path) -> dict:
    """The folder's CLIP tokenizers (``tokenizer``, ``tokenizer_2``; a refiner has only the second),
    as both pipelines' ``from_pretrained`` would load them (offline)."""
    from transformers import CLIPTokenizer

    out = {}
    for sub in ("tokenizer", "tokenizer_2"):
        if (Path(pipeline_dir) / sub).is_dir():
            out[sub] = CLIPTokenizer.from_pretrained(str(Path(pipeline_dir) / sub), local_files_only=True)
    return out
