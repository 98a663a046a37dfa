"""Port faults that only exist at real size (see sitecustomize.py in this folder)."""
from __future__ import annotations


def _truncate_middle() -> None:
    """The middle block's transformer stack runs one block short (an off-by-one in the depth loop);
    its weights and LoRA still load, so only the computation is wrong."""
    from lora_parity.backends.port import unet as unet_mod

    init = unet_mod.UNetModel.__init__
    construct = unet_mod.SpatialTransformer.construct

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for name, cell in self.cells_and_names():
            if name == "middle_block.1":
                cell.fault_skip_last = True

    def patched_construct(self, x, context):
        if not getattr(self, "fault_skip_last", False):
            return construct(self, x, context)
        b, c, h, w = x.shape
        out = self.proj_in(self.norm(x).reshape(b, c, h * w).transpose(0, 2, 1))
        for block in list(self.transformer_blocks)[:-1]:
            out = block(out, context)
        return self.proj_out(out).transpose(0, 2, 1).reshape(b, c, h, w) + x

    unet_mod.UNetModel.__init__ = patched_init
    unet_mod.SpatialTransformer.construct = patched_construct


def _drop_aesthetic() -> None:
    """The refiner's aesthetic score lost on the way to the conditioning vector (taken as 0)."""
    from lora_parity.backends.port import unet as unet_mod

    vector = unet_mod.sdxl_vector

    def patched(*args, aesthetic_score=None, **kwargs):
        return vector(*args, aesthetic_score=None if aesthetic_score is None else 0.0, **kwargs)

    unet_mod.sdxl_vector = patched


FAULTS = {"truncate_middle": _truncate_middle, "drop_aesthetic": _drop_aesthetic}


def apply(name: str) -> None:
    FAULTS[name]()


# --------------------------------------------------------------------------------------------
# The mutation catalogue's MindSpore-side faults (scripts/mutants.py, tests/test_default_path_faults.py).
# Each is a realistic bug in one place of the port: its weight loading, LoRA injection, the
# model's numerics, the base-weight map it reads a diffusers folder through, or the sampler.

TE2 = "conditioner.embedders.1.model."


# ---- weight loading: lora_parity/backends/port/capture.py

def _lora_unet_only() -> None:
    """``_Loader.fill`` injects the LoRA into the UNet only (text encoders run without theirs)."""
    from lora_parity.backends.port.unet import UNetModel
    from lora_parity.backends.port import capture as ms_side

    fill = ms_side._Loader.fill

    def patched(self, cell, **kwargs):
        if isinstance(cell, UNetModel):
            return fill(self, cell, **kwargs)
        kept, self.lora = self.lora, {}
        try:
            return fill(self, cell, **kwargs)
        finally:
            self.lora = kept

    ms_side._Loader.fill = patched


def _te2_layer_lora_dropped() -> None:
    """The LoRA tensors of one OpenCLIP layer (resblocks.1) are lost while reading the .ckpt."""
    from lora_parity.backends.port import capture as ms_side

    read = ms_side._lora_tensors

    def patched(req, layout):
        tensors, alphas = read(req, layout)
        gone = TE2 + "transformer.resblocks.1."
        return {k: v for k, v in tensors.items() if not k.startswith(gone)}, alphas

    ms_side._lora_tensors = patched


def _lora_b_transposed() -> None:
    """lora_B read in (in, out) order and reshaped to fit: ``B.T.reshape(B.shape)`` (Dense layout mix-up)."""
    import numpy as np

    from lora_parity.backends.port import capture as ms_side

    read = ms_side._lora_tensors

    def patched(req, layout):
        tensors, alphas = read(req, layout)
        out = {}
        for k, v in tensors.items():
            if k.endswith(".lora_B.weight") and v.ndim == 2:
                v = np.ascontiguousarray(v.T).reshape(v.shape)
            out[k] = v
        return out, alphas

    ms_side._lora_tensors = patched


# ---- LoRA injection and scale: lora_parity/backends/port/lora.py

def _patch_scale(fn) -> None:
    from lora_parity.backends.port import lora as lora_mod

    attach = lora_mod._attach

    def patched(cell, fan_in, fan_out, r, scale):
        return attach(cell, fan_in, fan_out, r, fn(scale, r))

    lora_mod._attach = patched


def _lora_scale_ignored() -> None:
    """The LoRA applied at scale 1 (alpha ignored, as if alpha = r)."""
    _patch_scale(lambda scale, r: 1.0)


def _lora_scale_inverted() -> None:
    """scale = r / alpha instead of alpha / r."""
    _patch_scale(lambda scale, r: 1.0 / scale)


def _in_proj_lora_rows_kqv() -> None:
    """The fused OpenCLIP in_proj LoRA output added in k/q/v row order instead of q/k/v."""
    from mindspore import ops

    from lora_parity.backends.port import text

    def construct(self, x):
        out = self.lora_B(self.lora_A(x)) * self.scale
        w = out.shape[-1] // 3
        return ops.concat((out[..., w:2 * w], out[..., :w], out[..., 2 * w:]), axis=-1)

    text._LoRAPair.construct = construct


# ---- the port's numerics: lora_parity/backends/port/{unet,text,vae}.py

def _groupnorm_eps() -> None:
    """ResBlock / ``out`` GroupNorm eps 1e-6 (the SpatialTransformer's) instead of SGM's 1e-5."""
    from lora_parity.backends.port import unet as unet_mod

    init = unet_mod.UNetModel.__init__

    def patched(self, layout, *args, resblock_eps=1e-5, **kwargs):
        init(self, layout, *args, resblock_eps=1e-6, **kwargs)

    unet_mod.UNetModel.__init__ = patched


def _timestep_sin_cos_swapped() -> None:
    """Sinusoidal embedding ``[sin, cos]`` instead of SGM's cos-first (flip_sin_to_cos) order."""
    from mindspore import ops

    from lora_parity.backends.port import unet as unet_mod

    embed = unet_mod.timestep_embedding

    def patched(timesteps, dim, *args, **kwargs):
        emb = embed(timesteps, dim, *args, **kwargs)
        half = dim // 2
        return ops.concat((emb[:, half:2 * half], emb[:, :half], emb[:, 2 * half:]), axis=-1)

    unet_mod.timestep_embedding = patched


def _self_attention_qk_swapped() -> None:
    """UNet self-attention called as attention(k, q, v)."""
    from lora_parity.backends.port import unet as unet_mod
    from lora_parity.backends.port.layers import attention

    construct = unet_mod.CrossAttention.construct

    def patched(self, x, context=None):
        if context is not None:
            return construct(self, x, context)
        return self.to_out(attention(self.to_k(x), self.to_q(x), self.to_v(x), self.heads))

    unet_mod.CrossAttention.construct = patched


def _qkv_split_wrong_order() -> None:
    """OpenCLIP's fused in_proj output split as k, q, v."""
    from lora_parity.backends.port import text
    from lora_parity.backends.port.layers import attention

    def construct(self, x, mask):
        b, length, w = x.shape
        x2 = x.reshape(b * length, w)
        qkv = self._matmul(x2, self.in_proj_weight.astype(x.dtype)) + self.in_proj_bias.astype(x.dtype)
        if self.in_proj is not None and not self.in_proj.merged:
            qkv = qkv + self.in_proj(x2)
        qkv = qkv.reshape(b, length, 3 * w)
        k, q, v = qkv[:, :, :w], qkv[:, :, w:2 * w], qkv[:, :, 2 * w:]
        return self.out_proj(attention(q, k, v, self.heads, mask))

    text.MultiheadAttention.construct = construct


def _last_hidden_state_as_context() -> None:
    """Text encoders hand the UNet their last layer's states, not the penultimate (SDXL's clip skip)."""
    from lora_parity.backends.port import text

    build = text.build_text_encoder

    def patched(layout, hf_config=None, **kwargs):
        return build(layout, hf_config, hidden_layer=-1, **kwargs)

    text.build_text_encoder = patched  # ms_side imports it from the module at capture time


def _crop_and_original_size_swapped() -> None:
    """The SDXL vector built from (crop, original size, target) instead of (original size, crop, target)."""
    from lora_parity.backends.port import unet as unet_mod

    vector = unet_mod.sdxl_vector

    def patched(pooled, original_size, crop_coords_top_left, *args, **kwargs):
        return vector(pooled, crop_coords_top_left, original_size, *args, **kwargs)

    unet_mod.sdxl_vector = patched


def _vae_scaling_factor_missing() -> None:
    """The VAE decodes the latents without dividing by ``scaling_factor``."""
    from lora_parity.backends.port import vae as vae_mod

    construct = vae_mod.VAEDecoder.construct

    def patched(self, z, scaled=True):
        return construct(self, z, scaled=False)

    vae_mod.VAEDecoder.construct = patched


# ---- base weights read from a diffusers folder: lora_parity/bases/sources.py (fullweights param maps)

def _patch_param_maps(edit) -> None:
    from lora_parity.bases import sources

    maps = sources.param_maps

    def patched(*args, **kwargs):
        return edit(list(maps(*args, **kwargs)))

    sources.param_maps = patched


def _text_projection_not_transposed() -> None:
    """``text_projection`` copied as stored (Linear (out, in)) where SGM wants it transposed."""
    from dataclasses import replace

    _patch_param_maps(lambda ms: [replace(m, rule="copy") if m.rule == "transpose" else m for m in ms])


def _in_proj_concat_kqv() -> None:
    """OpenCLIP's fused in_proj built from diffusers' k, q, v (in that order) instead of q, k, v."""
    from dataclasses import replace

    def edit(ms):
        return [replace(m, diffusers=(m.diffusers[1], m.diffusers[0], m.diffusers[2])) if m.rule == "concat" else m
                for m in ms]

    _patch_param_maps(edit)


def _up_attention_index_off_by_one() -> None:
    """Base weights of ``output_blocks.0.1`` and ``output_blocks.1.1`` exchanged (up_blocks.0.attentions
    index off by one; same shapes, so nothing complains)."""
    from dataclasses import replace

    a, b = "model.diffusion_model.output_blocks.0.1.", "model.diffusion_model.output_blocks.1.1."

    def edit(ms):
        by = {m.sgm: m for m in ms}
        out = []
        for m in ms:
            if m.sgm.startswith((a, b)):
                other = (b + m.sgm[len(a):]) if m.sgm.startswith(a) else (a + m.sgm[len(b):])
                m = replace(m, diffusers=by[other].diffusers)
            out.append(m)
        return out

    _patch_param_maps(edit)


# ---- the sampler: lora_parity/backends/port/sampler.py and lora_parity/sampling.py

def _cfg_wrong_branch() -> None:
    """Guidance pushes away from the prompt: ``c + g * (u - c)``."""
    from lora_parity.backends.port import sampler

    guide = sampler.guide
    sampler.guide = lambda eps_uncond, eps_cond, guidance: guide(eps_cond, eps_uncond, guidance)


def _input_scale_sigma_off_by_one() -> None:
    """``scale_model_input`` divides by the next step's sqrt(sigma**2 + 1) (sigma index + 1)."""
    from lora_parity.backends.port import sampler

    scale = sampler.scale_input
    sampler.scale_input = lambda x, schedule, i: scale(x, schedule, i + 1)


def _init_noise_sigma_missing() -> None:
    """The start noise is not multiplied by ``init_noise_sigma``."""
    from lora_parity.backends.port import sampler

    denoise = sampler.denoise

    def patched(*args, **kwargs):
        kwargs["scale_initial_noise"] = False
        return denoise(*args, **kwargs)

    sampler.denoise = patched


def _unconditional_not_zeroed() -> None:
    """``force_zeros_for_empty_prompt`` ignored: the unconditional branch gets the prompt's context."""
    from lora_parity.backends.port import sampler

    sampler.unconditional = lambda context, y, *args, **kwargs: (context, y)


def _timesteps_off_by_one() -> None:
    """Timesteps one off: "leading" spacing without ``steps_offset`` (SDXL's 1), "linspace" over
    0..num_train_timesteps instead of 0..num_train_timesteps - 1; the sigmas follow the timesteps."""
    import numpy as np

    from lora_parity import sampling

    timesteps = sampling._timesteps

    def patched(spacing, n_train, n, offset):
        if spacing == "linspace":
            return np.linspace(0, n_train, n, dtype=np.float32)[::-1].copy()
        return timesteps(spacing, n_train, n, 0)

    sampling._timesteps = patched


def _euler_dt_sign() -> None:
    """Euler step length ``sigma_i - sigma_{i+1}`` (sign flipped)."""
    import numpy as np

    from lora_parity import sampling

    sampling.EulerSchedule.dt = lambda self, i: np.float32(self.sigmas[i] - self.sigmas[i + 1])


FAULTS.update({
    "lora_unet_only": _lora_unet_only,
    "te2_layer_lora_dropped": _te2_layer_lora_dropped,
    "lora_b_transposed": _lora_b_transposed,
    "lora_scale_ignored": _lora_scale_ignored,
    "lora_scale_inverted": _lora_scale_inverted,
    "in_proj_lora_rows_kqv": _in_proj_lora_rows_kqv,
    "groupnorm_eps": _groupnorm_eps,
    "timestep_sin_cos_swapped": _timestep_sin_cos_swapped,
    "self_attention_qk_swapped": _self_attention_qk_swapped,
    "qkv_split_wrong_order": _qkv_split_wrong_order,
    "last_hidden_state_as_context": _last_hidden_state_as_context,
    "crop_and_original_size_swapped": _crop_and_original_size_swapped,
    "vae_scaling_factor_missing": _vae_scaling_factor_missing,
    "text_projection_not_transposed": _text_projection_not_transposed,
    "in_proj_concat_kqv": _in_proj_concat_kqv,
    "up_attention_index_off_by_one": _up_attention_index_off_by_one,
    "cfg_wrong_branch": _cfg_wrong_branch,
    "input_scale_sigma_off_by_one": _input_scale_sigma_off_by_one,
    "init_noise_sigma_missing": _init_noise_sigma_missing,
    "unconditional_not_zeroed": _unconditional_not_zeroed,
    "timesteps_off_by_one": _timesteps_off_by_one,
    "euler_dt_sign": _euler_dt_sign,
})


def _mindone_faults() -> dict:
    """The ``mindone`` backend's faults (mindone_fault_patches.py, next to this file), loaded by path:
    this module is imported from the child's ``PYTHONPATH`` and by file from the tests."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "mindone_fault_patches"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(name + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].FAULTS


FAULTS.update(_mindone_faults())
