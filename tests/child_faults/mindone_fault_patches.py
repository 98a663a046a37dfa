"""Faults planted in the ``mindone`` side child (mindone.diffusers, run by ``.venv-mindone/bin/python``).

Why a separate file: the port's faults (``child_fault_patches.py``) patch this project's SGM port;
these patch what the ``mindone`` backend runs -- mindone.diffusers / mindone.transformers as
loaded, mindone's LoRA loader and scheduler, and our CPU compatibility layer
(``lora_parity/backends/mindone/compat.py``).  Each is a bug that could be written in one of
those places and that no loader check notices (shapes stay equal, every LoRA tensor lands).

``child_fault_patches.FAULTS`` includes :data:`FAULTS`, so the same ``PYTHONPATH`` +
``LORA_PARITY_TEST_FAULT`` plant reaches this interpreter too: ``sitecustomize.py`` runs at
the child's start, whichever environment's Python that is.  Nothing here imports mindone or
MindSpore at module level (the port's environment has no mindone); each fault imports what
it patches when it is applied, just before the capture.
"""
from __future__ import annotations

UNET_ATTN1 = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"  # the first UNet self-attention
TE2_ATTENTION = "text_model.encoder.layers.1.self_attn"  # text_encoder_2 layer 1 (hidden_states.2)
FIRST_RESNET = "down_blocks.0.resnets.0"
LORA_SCALE_ERROR = 1.003


# ---- helpers

def _quiet_import(module: str, attr: str | None = None):
    """Import ``module`` without the chatter the capture silences when it imports mindone itself
    (MindSpore's deprecation notices, transformers' import-time prints, mindone's FutureWarnings):
    a fault imports it first, before the capture gets to do that.  ``attr``: an attribute of the module,
    resolved inside the same silence (mindone's packages import their submodules lazily)."""
    import contextlib
    import importlib
    import io
    import os
    import warnings

    os.environ.setdefault("GLOG_v", "3")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)


def _after_from_pretrained(cls, edit) -> None:
    """``cls.from_pretrained`` as before, then ``edit(model)`` on the model it built (this class only)."""
    func = cls.from_pretrained.__func__

    def patched(klass, *args, **kwargs):
        out = func(klass, *args, **kwargs)
        if klass is cls:
            edit(out[0] if isinstance(out, tuple) else out)
        return out

    cls.from_pretrained = classmethod(patched)


def _cell(model, name: str):
    cells = dict(model.cells_and_names())
    if name not in cells:
        raise RuntimeError(f"fault plant: {type(model).__name__} has no cell {name!r}")
    return cells[name]


def _swap_projections(model, block: str, a: str, b: str) -> None:
    """Exchange the weights (and biases) of two same-shaped projections of ``block``."""
    import mindspore as ms

    owner = _cell(model, block)
    ca, cb = getattr(owner, a), getattr(owner, b)
    for pname in ("weight", "bias"):
        pa, pb = getattr(ca, pname, None), getattr(cb, pname, None)
        if pa is None and pb is None:
            continue
        va, vb = pa.asnumpy().copy(), pb.asnumpy().copy()
        pa.set_data(ms.Tensor(vb, pa.dtype))
        pb.set_data(ms.Tensor(va, pb.dtype))


def _replace_compat(target_suffix: str, replacement) -> None:
    """Our CPU compatibility table with one rebinding computed wrongly (applied by ``apply_cpu_compat``)."""
    import dataclasses

    compat = _quiet_import("lora_parity.backends.mindone.compat")

    hit = False
    entries = []
    for entry in compat.CPU_COMPAT:
        patches = []
        for target, fn in entry.patches:
            if target.endswith(target_suffix):
                fn, hit = replacement, True
            patches.append((target, fn))
        entries.append(dataclasses.replace(entry, patches=tuple(patches)))
    if not hit:
        raise RuntimeError(f"fault plant: no compat entry rebinds *{target_suffix}")
    compat.CPU_COMPAT = tuple(entries)


# ---- our CPU compatibility layer: lora_parity/backends/mindone/compat.py

def _compat_gelu_tanh() -> None:
    """The compat GELU computes the tanh approximation where mint's exact (erf) form is asked for
    (text_encoder_2's MLP, the UNet's GEGLU)."""
    compat = _quiet_import("lora_parity.backends.mindone.compat")

    gelu = compat.gelu
    _replace_compat("nn.functional.gelu", lambda input, approximate="none": gelu(input, approximate="tanh"))


def _compat_layernorm_eps() -> None:
    """The compat ``mint.nn.LayerNorm.construct`` normalises with eps 1e-6, not the layer's own (1e-5):
    the UNet transformer blocks' norms."""
    compat = _quiet_import("lora_parity.backends.mindone.compat")

    layer_norm = compat.layer_norm
    _replace_compat("nn.LayerNorm.construct",
                    lambda self, input: layer_norm(input, self.normalized_shape, self.weight, self.bias, 1e-6))


# ---- mindone's LoRA loader: mindone/diffusers/loaders/lora_pipeline.py (PEFT scaling)

def _lora_scale_off() -> None:
    """After ``load_lora_weights`` every PEFT layer's ``scaling`` is 1.003 x alpha / r (a rounding of alpha
    in the loader's path): a 0.3% LoRA scale error in the UNet and both text encoders."""
    Mixin = _quiet_import("mindone.diffusers.loaders.lora_pipeline",
                          "StableDiffusionXLLoraLoaderMixin")

    load = Mixin.load_lora_weights

    def patched(self, *args, **kwargs):
        out = load(self, *args, **kwargs)
        touched = 0
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(self, comp, None)
            for _, cell in (model.cells_and_names() if model is not None else ()):
                scaling = getattr(cell, "scaling", None)
                if isinstance(scaling, dict):
                    for adapter in scaling:
                        scaling[adapter] *= LORA_SCALE_ERROR
                        touched += 1
        if not touched:
            raise RuntimeError("fault plant: no PEFT layer with a scaling after load_lora_weights")
        return out

    Mixin.load_lora_weights = patched


# ---- weights as mindone loads them: mindone's from_pretrained (state-dict names -> cells)

def _unet_attn1_qk_swapped() -> None:
    """``to_q`` and ``to_k`` of one UNet self-attention load each other's weights
    (``down_blocks.1.attentions.0``, transformer block 0)."""
    unet = _quiet_import("mindone.diffusers", "UNet2DConditionModel")

    _after_from_pretrained(unet, lambda m: _swap_projections(m, UNET_ATTN1, "to_q", "to_k"))


def _te2_layer_qk_swapped() -> None:
    """``q_proj`` and ``k_proj`` (weights and biases) of text_encoder_2's layer 1 load each other's."""
    te2 = _quiet_import("mindone.transformers", "CLIPTextModelWithProjection")

    _after_from_pretrained(te2,
                           lambda m: _swap_projections(m, TE2_ATTENTION, "q_proj", "k_proj"))


def _resnet_groupnorm_eps() -> None:
    """One UNet resnet (``down_blocks.0.resnets.0``) built with GroupNorm eps 1e-6 instead of 1e-5."""
    unet = _quiet_import("mindone.diffusers", "UNet2DConditionModel")

    def edit(model):
        resnet = _cell(model, FIRST_RESNET)
        resnet.norm1.eps = 1e-6
        resnet.norm2.eps = 1e-6

    _after_from_pretrained(unet, edit)


# ---- mindone's Euler scheduler: mindone/diffusers/schedulers/scheduling_euler_discrete.py

def _euler_steps_offset_dropped() -> None:
    """``set_timesteps`` ignores ``steps_offset`` (SDXL's 1): timesteps 500, 0 instead of 501, 1 for
    2 "leading" steps, the sigmas following them."""
    EulerDiscreteScheduler = _quiet_import("mindone.diffusers", "EulerDiscreteScheduler")

    set_timesteps = EulerDiscreteScheduler.set_timesteps

    def patched(self, *args, **kwargs):
        offset = self.config.steps_offset
        self.register_to_config(steps_offset=0)
        try:
            return set_timesteps(self, *args, **kwargs)
        finally:
            self.register_to_config(steps_offset=offset)

    EulerDiscreteScheduler.set_timesteps = patched


FAULTS = {
    "mindone_compat_gelu_tanh": _compat_gelu_tanh,
    "mindone_compat_layernorm_eps": _compat_layernorm_eps,
    "mindone_lora_scale_off": _lora_scale_off,
    "mindone_unet_attn1_qk_swapped": _unet_attn1_qk_swapped,
    "mindone_te2_layer_qk_swapped": _te2_layer_qk_swapped,
    "mindone_resnet_groupnorm_eps": _resnet_groupnorm_eps,
    "mindone_euler_steps_offset_dropped": _euler_steps_offset_dropped,
}
