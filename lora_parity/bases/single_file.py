"""The official single-file SGM checkpoints (``sd_xl_base_1.0.safetensors``, ``sd_xl_refiner_1.0...``).

They hold every SGM parameter in *torch* spellings (norms ``weight``/``bias``,
embeddings ``weight``), fp16, VAE encoder included.  The MindSpore port names the
same parameters with MindSpore spellings (``gamma``/``beta``/``embedding_table``);
the rename is derived from :func:`lora_parity.convert.fullweights.param_maps` (which equals
the port's parameter list, see tests/test_fullweights.py) by swapping only those
MindSpore leaf names, so no name is listed by hand.  Files already in MindSpore
spellings (MindONE's safetensors) are read as they are.

Which model a file is comes from its names and shapes: the refiner keeps its only
text encoder at ``conditioner.embedders.0.model``; ``input_blocks.0.0.weight`` has
320 (base), 384 (refiner) or the tiny models' output channels.  Then every name
and shape is checked against the built-in configs (built on the meta device).

The PyTorch side needs a diffusers folder: :func:`materialize` writes one into the
cache (built-in configs, generated tokenizers, scheduler, weights converted with
:func:`~lora_parity.convert.fullweights.sgm_to_diffusers` parameter by parameter, streamed,
in the file's dtype), atomically, once per (file name, size, mtime).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lora_parity.errors import LoraParityError
from lora_parity.convert.fullweights import (ParamMap, VaeLayout, normalize_diffusers_names, param_maps, sgm_only_params,
                           sgm_to_diffusers)
from lora_parity.convert.tensor import Tensor
from lora_parity.bases.configs import PIPELINES, PipelineConfigs, meta_state_shapes, write_skeleton
from lora_parity.bases.sources import DiffusersFolderWeights, LazySafetensors, sgm_shape, write_component_weights, write_safetensors_streaming

# MindSpore's parameter names -> torch's: nn.LayerNorm/GroupNorm gamma/beta, nn.Embedding embedding_table
_TORCH_LEAF = {"gamma": "weight", "beta": "bias", "embedding_table": "weight"}
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_REFINER_TE = "conditioner.embedders.0.model."
MARKER = "lora-parity-single-file.json"
DTYPE_VARIANT = {"F16": "fp16", "BF16": "bf16", "F32": None}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model"}


def torch_spelling(ms_name: str) -> str:
    head, _, leaf = ms_name.rpartition(".")
    return f"{head}.{_TORCH_LEAF[leaf]}" if leaf in _TORCH_LEAF and head else ms_name


# buffers, not weights, that SGM checkpoints carry and no model here reads: HF CLIP's ``position_ids``
# (sometimes stored broken as floats) and the sampler's noise schedule
_IGNORED = re.compile(r"\.embeddings\.position_ids$|^denoiser\.sigmas$")


def _vae(cfgs: PipelineConfigs) -> VaeLayout:
    return VaeLayout.from_diffusers_config(cfgs.vae)


def expected_params(cfgs: PipelineConfigs) -> dict[str, tuple[tuple[int, ...], ParamMap | None]]:
    """MindSpore-spelled SGM name -> (shape, map) of every parameter; map None for SGM-only ones."""
    diff_shapes = {}
    for comp, cfg in cfgs.components().items():
        diff_shapes.update(normalize_diffusers_names(
            {f"{comp}.{k}": s for k, s in meta_state_shapes(comp, cfg).items()}))
    layout = cfgs.layout()
    out: dict[str, tuple[tuple[int, ...], ParamMap | None]] = {
        m.sgm: (sgm_shape(m.rule, [diff_shapes[d] for d in m.diffusers]), m) for m in param_maps(layout, _vae(cfgs))}
    out.update({k: (tuple(v.shape), None) for k, v in sgm_only_params(layout).items()})
    return out


def detect(st: LazySafetensors) -> PipelineConfigs:
    """Which built-in model a single file is, from the refiner's encoder slot and UNet width."""
    if _UNET_IN not in st.entries or len(st.shape(_UNET_IN)) != 4:
        raise LoraParityError("not an SGM SDXL single-file checkpoint (no 4-D UNet input conv)",
                              path=st.path, key=_UNET_IN)
    refiner = any(k.startswith(_REFINER_TE) for k in st.entries)
    width = st.shape(_UNET_IN)[0]
    for cfgs in PIPELINES.values():
        if cfgs.is_refiner == refiner and cfgs.unet["block_out_channels"][0] == width:
            return cfgs
    raise LoraParityError(f"not an SDXL base/refiner single file: UNet width {width}, "
                          f"{'refiner' if refiner else 'base'}-style text encoders", path=st.path, key=_UNET_IN)


class SingleFileWeights:
    """A single-file SGM checkpoint seen with the MindSpore port's names; float32, one tensor at a time."""

    def __init__(self, path: Path, cfgs: PipelineConfigs | None = None):
        self.path = Path(path)
        self.st = LazySafetensors(self.path)
        self.cfgs = cfgs or detect(self.st)
        self.expected = expected_params(self.cfgs)
        to_ms = {torch_spelling(n): n for n in self.expected}
        to_ms.update({n: n for n in self.expected})  # MindSpore-spelled files (MindONE safetensors) too
        extra = sorted(k for k in self.st.entries if k not in to_ms and not _IGNORED.search(k))
        if extra:
            raise LoraParityError(f"{len(extra)} name(s) not in {self.cfgs.name}: {', '.join(extra[:8])}",
                                  path=self.path, key=extra[0])
        self._file_key = {to_ms[k]: k for k in self.st.entries if k in to_ms}
        self._fixed = {k: v for k, v in sgm_only_params(self.cfgs.layout()).items() if k not in self._file_key}
        missing = sorted(set(self.expected) - set(self._file_key) - set(self._fixed))
        if missing:
            raise LoraParityError(f"{len(missing)} {self.cfgs.name} weight(s) missing: "
                                  f"{', '.join(torch_spelling(n) for n in missing[:8])}",
                                  path=self.path, key=torch_spelling(missing[0]))
        for name, key in self._file_key.items():
            want = self.expected[name][0]
            got = self.st.shape(key)
            if got != want and not (self.expected[name][1] is None and int(np.prod(got)) == int(np.prod(want))):
                raise LoraParityError(f"shape {list(got)}, {self.cfgs.name} has {list(want)}", path=self.path, key=key)

    def names(self) -> set[str]:
        return set(self._file_key) | set(self._fixed)

    def load_raw(self, names: Iterable[str]) -> Iterator[tuple[str, Tensor]]:
        """In the file's dtype (bitwise), MindSpore names; SGM-only shapes as the port has them."""
        for name in names:
            if name in self._fixed:
                yield name, Tensor("F32", np.asarray(self._fixed[name], dtype=np.float32))
            elif name in self._file_key:
                t = self.st.read(self._file_key[name])
                yield name, Tensor(t.dtype, t.data.reshape(self.expected[name][0]))
            else:
                raise LoraParityError("no such SGM weight in this file", path=self.path, key=name)

    def load(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
        for name, t in self.load_raw(names):
            yield name, t.to_float("float32")

    @property
    def variant(self) -> str | None:
        return DTYPE_VARIANT.get(self.st.dtype(_UNET_IN))

    def write_component(self, out_dir: Path, comp: str) -> None:
        """One diffusers component's weights, converted parameter by parameter, streamed."""
        shapes = meta_state_shapes(comp, self.cfgs.components()[comp])
        actual = normalize_diffusers_names({f"{comp}.{k}": k for k in shapes})
        owner = {actual[d]: (m, d) for _, m in self.expected.values() if m is not None for d in m.diffusers
                 if d in actual}
        if set(owner) != set(shapes):
            raise LoraParityError(f"{comp}: no SGM source for {sorted(set(shapes) - set(owner))[:3]}", path=self.path)
        entries = [(k, self.st.dtype(self._file_key[owner[k][0].sgm]), s) for k, s in shapes.items()]
        variant = self.variant
        write_component_weights(out_dir / comp, WEIGHT_FILES[comp], variant, entries,
                                self._diffusers_arrays(shapes, owner), {"format": "pt"})

    def _diffusers_arrays(self, shapes, owner) -> Iterator[np.ndarray]:
        last: tuple[str, dict] = ("", {})
        for k in shapes:
            m, d = owner[k]
            if last[0] != m.sgm:  # q/k/v of a fused in_proj come in a row: read it once
                (_, t), = self.load_raw([m.sgm])
                last = (m.sgm, sgm_to_diffusers({m.sgm: t.data}, [m]))
            yield last[1][d]


def materialize(weights: SingleFileWeights, cache: Path) -> Path:
    """``<cache>/single-file/<stem>-<size>-<mtime_ns>/``: a diffusers folder of the file, made once."""
    st = weights.path.stat()
    final = Path(cache) / "single-file" / f"{weights.path.stem}-{st.st_size}-{st.st_mtime_ns}"
    if (final / MARKER).is_file():
        return final
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)  # only ever renamed complete: without its marker it is debris
    try:
        write_skeleton(tmp, weights.cfgs)
        for comp in weights.cfgs.components():
            weights.write_component(tmp, comp)
        (tmp / MARKER).write_text(json.dumps({"source": str(weights.path.resolve()), "model": weights.cfgs.name,
                                              "variant": weights.variant}, indent=2, allow_nan=False) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_single_file(pipeline_dir: Path, out_path: Path, variant: str | None = None) -> Path:
    """Write a diffusers pipeline folder as one SGM checkpoint in the official torch spellings.

    Tensors keep their dtype and bytes; ``logit_scale`` (which diffusers lacks) is written at
    OpenCLIP's init in float32 and CLIP-L's ``position_ids`` buffer as int64, as the official
    files carry them.  Streamed, atomic.
    """
    src = DiffusersFolderWeights(Path(pipeline_dir), variant)
    names = src.ordered_names()
    entries = [(torch_spelling(n), src.dtype(n), src.shape(n)) for n in names]
    pos = [f"{te.sgm_prefix}text_model.embeddings.position_ids"
           for te in src.layout.text_encoders if te.style == "hf"]
    lengths = [te.max_position_embeddings for te in src.layout.text_encoders if te.style == "hf"]
    entries += [(p, "I64", (1, n)) for p, n in zip(pos, lengths)]
    arrays = chain((t.data for _, t in src.load_raw(names)), (np.arange(n, dtype=np.int64)[None] for n in lengths))
    write_safetensors_streaming(Path(out_path), entries, arrays)
    return Path(out_path)


__all__ = ["SingleFileWeights", "detect", "materialize", "torch_spelling", "write_single_file"]
