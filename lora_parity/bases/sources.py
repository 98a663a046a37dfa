"""Streaming weight sources in SGM names, and streaming safetensors I/O.

A full SDXL is ~7 GB in fp16 and this machine class has 24 GB shared, so nothing
here holds a whole model: a safetensors file is opened for its header only, and
each tensor is mapped when asked for and unmapped when its array goes (memory ~ one tensor;
for OpenCLIP's fused ``in_proj`` its three q/k/v parts).  The writer puts the
header first and then the tensors one by one, for the same reason.

:class:`DiffusersFolderWeights` is the MindSpore side's view of a diffusers
pipeline folder: diffusers names are mapped to SGM names (MindSpore spellings)
by :func:`lora_parity.convert.fullweights.param_maps`, the exact same rules as the
in-memory converter, applied one parameter at a time.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np

from lora_parity.atomic import atomic_output
from lora_parity.errors import CheckpointFormatError, LoraParityError
from lora_parity.convert.fullweights import (ParamMap, VaeLayout, diffusers_to_sgm, normalize_diffusers_names, param_maps,
                           sgm_only_params)
from lora_parity.convert.layout import ModelLayout, layout_from_pipeline_dir
from lora_parity.convert.safetensors_io import read_header
from lora_parity.convert.tensor import Tensor, from_st_name, itemsize, st_name, storage_dtype

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
# diffusers / transformers weight file names: stem, optional .variant, optional -0000i-of-0000n shard
_WEIGHT_FILE = re.compile(r"^(?P<stem>[^.]+?)(?:\.(?P<variant>[^.]+?))?(?:-\d+-of-\d+)?\.safetensors$")


class SgmWeights(Protocol):
    """SGM-named (MindSpore spellings) float32 weights, read lazily one tensor at a time."""

    def names(self) -> set[str]: ...

    def load(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]: ...


class LazySafetensors:
    """The header of one safetensors file; :meth:`read` fetches one tensor's bytes on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        entries, self.metadata, self._base = read_header(self.path)
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {
            k: (e.dtype, e.shape, e.begin, e.end) for k, e in entries.items()}

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def dtype(self, key: str) -> str:
        return self.entries[key][0]

    def read(self, key: str) -> Tensor:
        """The raw tensor (file dtype, bitwise): a read-only view of the file's pages, mapped while the
        returned array lives.  Why not ``read``: it copies every byte into fresh memory first (measured,
        the full-size UNet's 5 GB: 11.6 s of a 34 s load), and the float32 cast that follows reads the
        pages once anyway."""
        dtype, shape, begin, end = self.entries[key]
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < self._base + end:
                raise CheckpointFormatError(f"file is {size} bytes, its header needs {self._base + end}",
                                            path=self.path, key=key)
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        count = (end - begin) // np.dtype(storage_dtype(dtype)).itemsize
        return Tensor(dtype, np.frombuffer(mapped, dtype=storage_dtype(dtype), count=count,
                                           offset=self._base + begin).reshape(shape))


def write_safetensors_streaming(path: Path, entries: Iterable[tuple[str, str, tuple[int, ...]]],
                                tensors: Iterable[np.ndarray], metadata: dict | None = None) -> None:
    """Write ``entries`` (name, dtype e.g. ``"F16"``, shape) from the iterable ``tensors``, in order.

    The header is written first, then each array as it arrives, so memory stays ~ one tensor.
    Each array must have the storage dtype and shape its entry announced; the file appears
    atomically at ``path`` only when complete.
    """
    entries = list(entries)
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize(dtype)
        header[name] = {"dtype": st_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    blob += b" " * (-len(blob) % 8)
    it = iter(tensors)
    with atomic_output(path) as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, dtype, shape in entries:
            arr = np.asarray(next(it))
            arr = arr if arr.flags.c_contiguous else arr.copy()  # (ascontiguousarray makes 0-d 1-d)
            if arr.dtype != storage_dtype(dtype) or tuple(arr.shape) != tuple(shape):
                raise ValueError(f"{name}: got {arr.dtype}{arr.shape}, header says {dtype}{tuple(shape)}")
            fh.write(memoryview(arr).cast("B"))


# Shards of at most 1 GiB: diffusers then loads (and upcasts) one shard at a time, so a 5 GB fp16
# SDXL UNet loads into float32 at ~10.3 + 1 GB instead of 10.3 + 5 GB (measured 11.6 vs 15.9 GB).
MAX_SHARD_BYTES = 1 << 30


def write_component_weights(comp_dir: Path, stem: str, variant: str | None,
                            entries: Iterable[tuple[str, str, tuple[int, ...]]], tensors: Iterable[np.ndarray],
                            metadata: dict | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """A component's weights as diffusers/transformers save them: one file, or shards plus an index.

    Names follow ``save_pretrained``: ``<stem>[.variant].safetensors``, shards
    ``<stem>[.variant]-0000i-of-0000n.safetensors`` and ``<stem>.safetensors.index[.variant].json``.
    Streams like :func:`write_safetensors_streaming` (memory ~ one tensor).
    """
    entries = list(entries)
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        nbytes = int(np.prod(e[2], dtype=np.int64)) * itemsize(e[1])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    v = f".{variant}" if variant else ""
    it = iter(tensors)
    if len(shards) == 1:
        path = comp_dir / f"{stem}{v}.safetensors"
        write_safetensors_streaming(path, entries, it, metadata)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = comp_dir / f"{stem}{v}-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streaming(path, shard, (next(it) for _ in shard), metadata)
        weight_map.update({name: path.name for name, _, _ in shard})
        paths.append(path)
    total = sum(int(np.prod(s, dtype=np.int64)) * itemsize(d) for _, d, s in entries)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (comp_dir / f"{stem}.safetensors.index{v}.json").write_text(json.dumps(index, indent=1, allow_nan=False) + "\n")
    return paths


def weight_files(comp_dir: Path, variant: str | None) -> list[Path]:
    """The safetensors files of one component for ``variant`` (None: the files without a variant)."""
    out, seen = [], set()
    for p in sorted(comp_dir.glob("*.safetensors")):
        m = _WEIGHT_FILE.match(p.name)
        if m:
            seen.add(m.group("variant"))
            if m.group("variant") == variant:
                out.append(p)
    if not out:
        want = f"*.{variant}.safetensors" if variant else "*.safetensors (without a variant)"
        there = ", ".join(sorted(f"variant {v}" if v else "no variant" for v in seen)) or "no safetensors"
        raise LoraParityError(f"no {want} weights in this component folder (found: {there})", path=comp_dir)
    return out


def sgm_shape(rule: str, parts: list[tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of an SGM parameter from its diffusers parts' shapes under ``rule``."""
    if rule == "transpose":
        return tuple(reversed(parts[0]))
    if rule == "conv_linear":
        return (*parts[0], 1, 1) if len(parts[0]) == 2 else parts[0]
    if rule == "concat":
        return (sum(p[0] for p in parts), *parts[0][1:])
    return parts[0]


class DiffusersFolderWeights:
    """A diffusers pipeline folder seen in SGM names: :meth:`load` streams float32 arrays."""

    def __init__(self, pipeline_dir: Path, variant: str | None = None):
        self.pipeline_dir = Path(pipeline_dir)
        self.variant = variant
        self.layout: ModelLayout = layout_from_pipeline_dir(self.pipeline_dir)
        vae_cfg = self.pipeline_dir / "vae" / "config.json"
        vae = VaeLayout.from_diffusers_config(json.loads(vae_cfg.read_text())) if vae_cfg.is_file() else None
        self._files: dict[str, tuple[LazySafetensors, str]] = {}  # normalized diffusers name -> (file, key)
        for comp in COMPONENTS:
            if not (self.pipeline_dir / comp / "config.json").is_file():
                continue
            for path in weight_files(self.pipeline_dir / comp, variant):
                st = LazySafetensors(path)
                full = normalize_diffusers_names({f"{comp}.{k}": k for k in st.entries})
                self._files.update({n: (st, k) for n, k in full.items()})
        self._maps = {m.sgm: m for m in param_maps(self.layout, vae)
                      if all(d in self._files for d in m.diffusers)}
        self._fixed = sgm_only_params(self.layout)

    def names(self) -> set[str]:
        return set(self._maps) | set(self._fixed)

    def ordered_names(self) -> list[str]:
        """Every name, in :func:`~lora_parity.convert.fullweights.param_maps` order, SGM-only ones last."""
        return [*self._maps, *self._fixed]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._fixed:
            return tuple(self._fixed[name].shape)
        m = self._map(name)
        return sgm_shape(m.rule, [self._files[d][0].shape(self._files[d][1]) for d in m.diffusers])

    def dtype(self, name: str) -> str:
        if name in self._fixed:
            return "F32"
        d = self._map(name).diffusers[0]
        return self._files[d][0].dtype(self._files[d][1])

    def _map(self, name: str) -> ParamMap:
        if name not in self._maps:
            raise LoraParityError("no such SGM weight in this diffusers folder", path=self.pipeline_dir, key=name)
        return self._maps[name]

    def load_raw(self, names: Iterable[str]) -> Iterator[tuple[str, Tensor]]:
        """Like :meth:`load`, but in the file's dtype, bitwise (rules only move bytes)."""
        for name in names:
            if name in self._fixed:
                yield name, Tensor("F32", np.asarray(self._fixed[name], dtype=np.float32))
                continue
            m = self._map(name)
            parts = [self._files[d][0].read(self._files[d][1]) for d in m.diffusers]
            dtype = parts[0].dtype
            if any(p.dtype != dtype for p in parts):
                raise LoraParityError("q/k/v parts have different dtypes", path=self.pipeline_dir, key=name)
            out = diffusers_to_sgm({d: p.data for d, p in zip(m.diffusers, parts)}, [m])
            yield name, Tensor(dtype, np.ascontiguousarray(out[name]))

    def load(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
        for name, t in self.load_raw(names):
            yield name, t.to_float("float32")
