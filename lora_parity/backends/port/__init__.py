"""SDXL (and SD 1.x / 2.x) in MindSpore cells, in the SGM / MindONE checkpoint layout (PyNative mode).

SD 1.x / 2.x run as MindONE's LDM code does (``examples/stable_diffusion_v2``): :class:`UNetModel` with
``family="sd1"`` / ``"sd2"`` (no ``label_emb``) and :class:`LDMTextEncoder` (``cond_stage_model.transformer.``,
fused ``attn.attn.in_proj``), their LoRA named ``lora_down`` / ``lora_up`` as MindONE's ``LoRADenseLayer``.

Every component's ``Parameter.name`` -- and ``parameters_and_names()`` -- is the full
MindONE checkpoint name (MindSpore spellings: ``gamma``/``beta`` for norms,
``embedding_table`` for embeddings), so a MindONE checkpoint loads with
``mindspore.load_param_into_net`` with nothing missing or unexpected:

* :class:`UNetModel` (``model.diffusion_model.``), with :func:`timestep_embedding`,
  :class:`ConcatTimestepEmbedderND` and :func:`sdxl_vector` for the ``y`` vector;
* :class:`HFCLIPTextEncoder` (``conditioner.embedders.0.transformer.``) and
  :class:`OpenCLIPTextEncoder` (``conditioner.embedders.1.model.``), or :func:`build_text_encoder`;
* :class:`VAEDecoder` (``first_stage_model.``);
* :func:`inject_lora` / :func:`merge_lora` / :func:`unmerge_lora` for MindONE-style LoRA;
* :func:`capture_activations` to record per-block outputs by SGM name;
* :func:`param_shapes` for names and shapes without loading anything;
* :func:`configure_cpu` -- call it first on a small CPU machine (10x faster PyNative);
* :func:`compile_for_graph` (or ``build_sdxl(..., graph=True)``) -- optional graph mode,
  same outputs, 1.5-4x faster on CPU after a one-off compile; PyNative is the default;
* :func:`set_conv_impl` -- switch convolutions between im2col+MatMul (default) and
  MindSpore's own Conv2D kernel (``"native"``), to test the native kernels;
* :mod:`.numerics` -- compute as MindONE's ``gm`` does (``"mindone"``, the default) or as
  diffusers does (``"diffusers"``) where they differ: :func:`set_numerics`, :func:`use_numerics`,
  :func:`current`, ``$LORA_PARITY_PORT_NUMERICS``; :func:`apply_numerics` re-stamps built cells.
"""
from __future__ import annotations

from lora_parity.backends.port.graph import compile_for_graph, run_graph, structure_key, uses_graph
from lora_parity.backends.port.layers import (Recordable, apply_numerics, capture_activations, full_param_names,
                                             set_conv_impl)
from lora_parity.backends.port.lora import LoraInjection, inject_lora, lora_state, lora_targets, merge_lora, unmerge_lora
from lora_parity.backends.port.numerics import (NUMERICS, POINTS, Numerics, current, current_numerics, set_numerics,
                       use_numerics)
from lora_parity.backends.port.model import SDXLComponents, build_sdxl, cast_params, load_params, param_shapes
from lora_parity.backends.port.runtime import configure_cpu
from lora_parity.backends.port.text import HFCLIPTextEncoder, OpenCLIPTextEncoder, build_text_encoder
from lora_parity.backends.port.ldm_text import LDMTextEncoder
from lora_parity.backends.port.unet import (SGM_UNET_PREFIX, ConcatTimestepEmbedderND, UNetModel, sdxl_vector,
                   timestep_embedding)
from lora_parity.backends.port.vae import SGM_VAE_PREFIX, VAEDecoder

__all__ = [
    "Recordable", "capture_activations", "full_param_names", "set_conv_impl",
    "compile_for_graph", "run_graph", "structure_key", "uses_graph",
    "LoraInjection", "inject_lora", "lora_state", "lora_targets", "merge_lora", "unmerge_lora",
    "SDXLComponents", "build_sdxl", "cast_params", "load_params", "param_shapes", "configure_cpu",
    "HFCLIPTextEncoder", "OpenCLIPTextEncoder", "LDMTextEncoder", "build_text_encoder",
    "SGM_UNET_PREFIX", "ConcatTimestepEmbedderND", "UNetModel", "sdxl_vector", "timestep_embedding",
    "SGM_VAE_PREFIX", "VAEDecoder",
    "NUMERICS", "POINTS", "Numerics", "apply_numerics", "current", "current_numerics", "set_numerics",
    "use_numerics",
]
