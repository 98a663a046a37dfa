"""Base models for ``--base SPEC``: diffusers folders, official SGM single files, generated random models.

:func:`resolve_base` gives a :class:`BaseModel` with a diffusers folder for the
PyTorch side and :meth:`BaseModel.sgm_weights` (a streaming :class:`SgmWeights`) for
the MindSpore side.  Needs numpy only to read weights; torch/diffusers/transformers
to generate configs, tokenizers and tensor lists.
"""
from __future__ import annotations

from lora_parity.bases.single_file import SingleFileWeights, write_single_file
from lora_parity.bases.sources import DiffusersFolderWeights, SgmWeights
from lora_parity.bases.spec import BaseModel, default_cache_dir, resolve_base

__all__ = ["BaseModel", "DiffusersFolderWeights", "SgmWeights", "SingleFileWeights", "default_cache_dir",
           "resolve_base", "write_single_file"]
