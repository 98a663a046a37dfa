"""Base models for ``--base SPEC``: diffusers folders, official SGM single files, generated random models.

:func:`resolve_base` gives a :class:`BaseModel` with a diffusers folder for the
PyTorch side and :meth:`BaseModel.sgm_weights` (a streaming :class:`SgmWeights`) for
the MindSpore side.  Needs numpy only to read weights; torch/diffusers/transformers
to generate configs, tokenizers and tensor lists.
"""
from __future__ import annotations

from .single_file import SingleFileWeights, write_single_file
from .sources import DiffusersFolderWeights, SgmWeights
from .spec import BaseModel, default_cache_dir, resolve_base

__all__ = ["BaseModel", "DiffusersFolderWeights", "SgmWeights", "SingleFileWeights", "default_cache_dir",
           "resolve_base", "write_single_file"]
