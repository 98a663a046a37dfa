"""Whole-model helpers: build every SDXL component from a layout, SGM conditioning, name/shape lists."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, ops

from lora_parity.convert.layout import ModelLayout, TextEncoderLayout
from lora_parity.backends.port import numerics as _nx
from lora_parity.backends.port.graph import compile_for_graph
from lora_parity.backends.port.layers import Recordable
from lora_parity.backends.port.runtime import configure_cpu
from lora_parity.backends.port.text import build_text_encoder
from lora_parity.backends.port.unet import REFINER_TIME_IDS, UNetModel, sdxl_vector, time_id_count
from lora_parity.backends.port.vae import VAEDecoder

from lora_parity.bases.configs import SDXL_VAE_CONFIG  # noqa: E402  (the released SDXL VAE, one copy)


_IGNORED = re.compile(r"^first_stage_model\.(encoder\.|quant_conv\.)|\.embeddings\.position_ids$")


# MindONE's SDXL key list (tools/model_conversion/mindspore_key_base.yaml) spells CLIP-L's token
# embedding this way, so base checkpoints converted with it carry the name below
_ALIASES = {
    "conditioner.embedders.1.model.token_embedding..embedding_table":
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.embedding_table",
}


@dataclass
class SDXLComponents:
    unet: UNetModel
    text_encoders: tuple[Recordable, ...]
    vae: VAEDecoder | None

    def cells(self) -> list[Recordable]:
        return [self.unet, *self.text_encoders, *([self.vae] if self.vae is not None else [])]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {p.name: tuple(p.shape) for c in self.cells() for p in c.get_parameters()}

    def load(self, params: dict, strict: bool = True) -> tuple[list[str], list[str]]:
        """Load a name -> Parameter dict (e.g. ``mindspore.load_checkpoint``) into every component.

        Returns (net params not loaded, checkpoint params not used).  Entries these cells do
        not model are not counted as unused: the VAE encoder side (``first_stage_model.encoder.*``,
        ``quant_conv``) and MindONE's CLIP ``embeddings.position_ids`` buffer-as-parameter.
        Known misspellings in MindONE-converted checkpoints (``_ALIASES``) are accepted.
        With ``strict`` a non-empty list raises ``ValueError``.
        """
        params = dict(params)
        for alias, name in _ALIASES.items():
            if alias in params and name not in params:
                params[name] = params.pop(alias)
        missing: list[str] = []
        used: set[str] = set()
        for cell in self.cells():
            sub = {k: v for k, v in params.items() if k in {p.name for p in cell.get_parameters()}}
            used.update(sub)
            missing.extend(load_params(cell, sub))
        unused = sorted(k for k in set(params) - used if not _IGNORED.search(k))
        if strict and (missing or unused):
            raise ValueError(f"checkpoint mismatch: {len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(unused)} unexpected (e.g. {unused[:3]})")
        return missing, unused

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled embedding in ``y``: the last (OpenCLIP) encoder's projection."""
        te = self.text_encoders[-1].layout
        return int(te.projection_dim or te.hidden_size)

    @property
    def time_id_count(self) -> int:
        """6 (SDXL base: sizes, crop, target size) or 5 (refiner: sizes, crop, aesthetic score)."""
        lay = self.unet.layout
        return time_id_count(lay.adm_in_channels, self.pooled_dim, lay.addition_time_embed_dim)

    @property
    def uses_aesthetic_score(self) -> bool:
        """Whether the UNet is conditioned on an aesthetic score (the SDXL refiner layout).

        Read from the layout, ``(adm_in_channels - pooled_dim) / addition_time_embed_dim == 5``,
        not from the encoder count: that is what ``label_emb`` really consumes.
        """
        return self.time_id_count == REFINER_TIME_IDS

    def conditioning(self, ids_per_encoder, original_size, crop_coords_top_left, target_size=None, *,
                     aesthetic_score: float | None = None) -> tuple[Tensor, Tensor | None]:
        """SGM conditioner: ``context`` = penultimate states concatenated on features; ``y`` vector
        = [pooled projected output of the last (OpenCLIP) encoder, size/crop/target sinusoids]
        (refiner: size/crop/aesthetic-score sinusoids; ``aesthetic_score`` is then required and
        ``target_size`` unused, see :func:`~.unet.sdxl_vector`)."""
        ids_per_encoder = list(ids_per_encoder)
        if len(ids_per_encoder) != len(self.text_encoders):
            raise ValueError(f"{len(ids_per_encoder)} token id arrays for {len(self.text_encoders)} text encoders")
        hidden, pooled = [], None
        for enc, ids in zip(self.text_encoders, ids_per_encoder):
            h, p = enc(ids)
            hidden.append(h)
            pooled = p
        context = ops.concat(hidden, axis=-1) if len(hidden) > 1 else hidden[0]
        if self.unet.family != "sdxl":  # SD 1.x / 2.x: the LDM text encoder's final-normed states, no vector
            return context, None
        y = sdxl_vector(pooled, original_size, crop_coords_top_left, target_size,
                        self.unet.layout.addition_time_embed_dim, aesthetic_score=aesthetic_score,
                        adm_in_channels=self.unet.layout.adm_in_channels)
        return context, y


def load_params(cell, params: dict) -> list[str]:
    """``load_param_into_net(cell, params, strict_load=True)`` after casting each value to the
    dtype of the cell's parameter (a float16 MindONE checkpoint into float32 cells, or back).

    Values may be Parameters, Tensors or numpy arrays.  Returns the names of ``cell``'s
    parameters that ``params`` did not provide.
    """
    own = {p.name: p for p in cell.get_parameters()}
    ready = {}
    for name, value in params.items():
        if name not in own:
            continue
        t = value if isinstance(value, Tensor) else Tensor(np.asarray(value))
        if t.dtype != own[name].dtype:
            t = t.astype(own[name].dtype)
        ready[name] = Parameter(t, name=name)
    not_loaded, _ = ms.load_param_into_net(cell, ready, strict_load=True)
    return list(not_loaded)


def cast_params(cell, dtype) -> None:
    """Store every parameter of ``cell`` in ``dtype`` (e.g. ``mindspore.float16``); norms and
    softmax still compute in float32, Dense/Conv compute in the input's dtype."""
    for p in cell.get_parameters():
        if p.dtype != dtype:
            p.set_dtype(dtype)


def build_sdxl(layout: ModelLayout, te_configs: tuple[dict | None, ...] | None = None,
               vae_config: dict | None = SDXL_VAE_CONFIG, *, configure_runtime: bool = True,
               graph: bool = False, numerics=None) -> SDXLComponents:
    """Every component for ``layout`` (weights lazily zero: load a checkpoint next).

    ``te_configs``: HF ``CLIPTextConfig`` dicts per text encoder (for ``hidden_act`` and
    ``layer_norm_eps``; None -> quick_gelu for CLIP-L, gelu for bigG).  ``vae_config``: a
    diffusers ``AutoencoderKL`` config, or None for no VAE.  ``configure_runtime`` calls
    :func:`~.runtime.configure_cpu` (synchronous op launch on CPU, ~10x faster PyNative).
    ``graph=True`` runs every component as a compiled MindSpore graph (same outputs, 1.5-4x
    faster on CPU after a one-off compile; recording still runs PyNative), see
    :func:`~.graph.compile_for_graph`.  Default: PyNative.  ``numerics``: the cells' numerics
    (``"mindone"`` / ``"diffusers"`` / a spec, see :mod:`.numerics`); default the selection in force.
    """
    if configure_runtime:
        configure_cpu()
    te_configs = te_configs or (None,) * len(layout.text_encoders)
    with _nx.use_numerics(_nx.resolve(numerics)):
        encoders = tuple(build_text_encoder(te, cfg) for te, cfg in zip(layout.text_encoders, te_configs))
        vae = VAEDecoder.from_diffusers_config(vae_config) if vae_config is not None else None
        comps = SDXLComponents(UNetModel(layout.unet, family=layout.family), encoders, vae)
    if graph:
        for cell in comps.cells():
            compile_for_graph(cell)
    return comps


def param_shapes(layout: ModelLayout | TextEncoderLayout, **kwargs) -> dict[str, tuple[int, ...]]:
    """SGM name -> shape of every parameter the cells for ``layout`` hold.

    Built by the very cells that run, under MindSpore's ``no_init_parameters`` (no initializer runs, nothing
    is allocated: the full SDXL base in 0.6 s instead of 1.7 s, measured here).
    """
    key = repr((layout, sorted(kwargs.items())))  # frozen layouts and plain configs: their repr is the value
    if key not in _SHAPES:
        _SHAPES[key] = _param_shapes(layout, **kwargs)
    return dict(_SHAPES[key])


#: param_shapes per process: a full SDXL's cells take 0.3-0.6 s to build even without their weights, and
#: checking a single file or a base asks for the same layout again
_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def _param_shapes(layout: ModelLayout | TextEncoderLayout, **kwargs) -> dict[str, tuple[int, ...]]:
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():
        if isinstance(layout, TextEncoderLayout):
            return {p.name: tuple(p.shape) for p in build_text_encoder(layout, **kwargs).get_parameters()}
        kwargs.setdefault("configure_runtime", False)
        return build_sdxl(layout, **kwargs).param_shapes()
