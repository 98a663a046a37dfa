"""The PyTorch side: a diffusers ``StableDiffusionXLPipeline`` with forward hooks.

Everything runs through the pipeline's own modules and helpers
(``encode_prompt``, ``_get_add_time_ids``, ``__call__`` with ``latents=``);
nothing is patched.  Hooks only read outputs, as float64 numpy copies.

LoRA files go through ``pipe.load_lora_weights`` and then a check
(:func:`load_lora_checked`) that every LoRA tensor in the file landed in a model
parameter, holding the file's values.  diffusers 0.42 keeps going when keys name
modules that do not exist (as long as one other key matched) and when a whole
component matched nothing; it only logs a warning, and it logs the same "No
LoRA keys associated" warning for every component a valid UNet-only LoRA does
not touch, so its messages alone cannot tell a bad conversion from a good one.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_parity.errors import LoraParityError
from lora_parity.backends.base import Activations

try:  # torch is an optional extra; is_available() reports what is missing
    import torch
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None  # type: ignore[assignment]


def _no_grad(fn):
    """``torch.no_grad`` that tolerates a missing torch at import time."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")

# diffusers module names hooked in the UNet, in the order of the forward pass
UNET_HOOK_PATTERNS = (
    r"time_embedding",
    r"add_embedding",
    r"conv_in",
    r"down_blocks\.\d+\.(resnets|attentions)\.\d+",
    r"down_blocks\.\d+\.downsamplers\.0",
    r"mid_block",
    r"mid_block\.(resnets|attentions)\.\d+",
    r"up_blocks\.\d+\.(resnets|attentions)\.\d+",
    r"up_blocks\.\d+\.upsamplers\.0",
    r"conv_out",
)
VAE_HOOK_PATTERNS = (
    r"post_quant_conv",
    r"decoder\.conv_in",
    r"decoder\.mid_block",
    r"decoder\.up_blocks\.\d+",
    r"decoder\.conv_norm_out",
    r"decoder\.conv_out",
)


class LoraLoadError(LoraParityError):
    """diffusers did not take every tensor of a LoRA file (or refused the file)."""


@dataclass(frozen=True)
class LoraLoadReport:
    path: str
    adapter_name: str
    loaded: tuple[str, ...]  # file-style keys found in the model, e.g. unet.<module>.lora_A.weight
    messages: tuple[str, ...]  # everything diffusers / peft logged or warned while loading


# ---------------------------------------------------------------- hooks


def hook_names(module: Any, patterns: Iterable[str]) -> list[str]:
    """Names of ``module``'s submodules that fully match one of ``patterns``, in module order."""
    regexes = [re.compile(p) for p in patterns]
    return [n for n, _ in module.named_modules() if n and any(r.fullmatch(n) for r in regexes)]


def _first_tensor(output: Any):
    """The main tensor of a module output: tensors as is, tuples/lists and ModelOutputs by first entry."""
    if torch is not None and isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):  # diffusers BaseOutput / transformers ModelOutput are OrderedDicts
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    raise TypeError(f"cannot find a tensor in module output of type {type(output).__name__}")


def to_numpy(t, dtype=np.float64) -> np.ndarray:
    return t.detach().to("cpu", torch.float64 if dtype == np.float64 else t.dtype).numpy().astype(dtype, copy=False)


@contextlib.contextmanager
def capture(module: Any, names: Iterable[str], prefix: str = "") -> Iterator[dict[str, np.ndarray]]:
    """Hook the named submodules of ``module`` for the duration of the ``with`` block.

    Yields a dict that fills with ``prefix + name -> float64 array`` in the order
    the modules run.  A module that runs more than once gets ``#1``, ``#2``...
    suffixes for its later calls.  Hooks are removed on exit.
    """
    out: dict[str, np.ndarray] = {}
    modules = dict(module.named_modules())
    handles = []

    def make_hook(key: str):
        def hook(_mod, _inp, output):
            name, k = key, 0
            while name in out:
                k += 1
                name = f"{key}#{k}"
            out[name] = to_numpy(_first_tensor(output))

        return hook

    try:
        for n in names:
            if n not in modules:
                raise KeyError(f"{type(module).__name__} has no submodule {n!r}")
            handles.append(modules[n].register_forward_hook(make_hook(prefix + n)))
        yield out
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- LoRA load check


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


_NO_KEYS = re.compile(r"No LoRA keys associated to (\w+) found with the prefix='(\w+)'")
_BAD_MESSAGE = re.compile(r"unexpected keys|missing keys|not found|not used|unused|were ignored|size mismatch",
                          re.IGNORECASE)
_LORA_TENSOR = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|lora_linear_layer\.down|"
                          r"lora_linear_layer\.up)\.weight$|_lora\.(down|up)\.weight$")
_PEFT_KEY = re.compile(r"^(unet|transformer|text_encoder|text_encoder_2|text_encoder_3)\.(.+)\.(lora_A|lora_B)\.weight$")


def _norm_key(key: str) -> str:
    # transformers 5 flattened CLIPTextModel (no ``text_model.``); diffusers strips it from LoRA keys
    return key.replace(".text_model.", ".")


def _injected(pipe, adapter: str) -> dict[str, Any]:
    """``component.<module>.lora_X.weight`` -> parameter, for every LoRA weight of ``adapter``."""
    found = {}
    tag = f".{adapter}.weight"
    for comp in LORA_COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for name, p in model.named_parameters():
            if name.endswith(tag) and (".lora_A." in name or ".lora_B." in name):
                found[_norm_key(f"{comp}.{name[: -len(tag)]}.weight")] = p
    return found


def load_lora_checked(pipe, path: str | Path, adapter_name: str = "parity") -> LoraLoadReport:
    """``pipe.load_lora_weights(path)``, then prove every LoRA tensor of the file is in the model.

    Raises :class:`LoraLoadError` naming the keys diffusers did not use (or its
    exception / complaints) instead of letting a half-loaded LoRA pass.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            file_tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - any reader failure is a format error
        raise LoraLoadError(f"not a readable safetensors LoRA ({exc})", path=path) from exc

    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    saved = [(lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:  # only the checker hears them: their own wording is reported when it matters
        lg.handlers = [handler]
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                pipe.load_lora_weights(str(path), adapter_name=adapter_name)
            except Exception as exc:  # noqa: BLE001 - reported with everything diffusers said
                said = "; ".join(handler.messages) or "nothing logged"
                raise LoraLoadError(f"diffusers refused the LoRA: {type(exc).__name__}: {exc} "
                                    f"(diffusers/peft said: {said})", path=path) from exc
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers = handlers
            lg.propagate = propagate
    messages = handler.messages + [f"{w.category.__name__}: {w.message}" for w in caught
                                   if not issubclass(w.category, (DeprecationWarning, FutureWarning))]

    injected = _injected(pipe, adapter_name)
    lora_keys = [k for k in file_tensors if _LORA_TENSOR.search(k)]
    problems: list[str] = []
    if not injected:
        problems.append(f"no LoRA weight was injected into {', '.join(LORA_COMPONENTS)}")
    if lora_keys and all(_PEFT_KEY.match(k) for k in lora_keys):
        # diffusers/PEFT layout: every key must be a parameter, holding the file's values
        unused = sorted(k for k in lora_keys if _norm_key(k) not in injected)
        if unused:
            problems.append(f"{len(unused)} of {len(lora_keys)} LoRA tensors not used: {', '.join(unused)}")
        for k in lora_keys:
            p = injected.get(_norm_key(k))
            if p is not None and not torch.equal(p.detach().cpu(), file_tensors[k].to(p.dtype)):
                problems.append(f"{k}: model holds different values than the file")
    elif len(injected) < len(lora_keys):  # kohya / old diffusers layouts: keys are renamed, count them
        problems.append(f"only {len(injected)} of {len(lora_keys)} LoRA tensors were injected")
    for m in messages:
        hit = _NO_KEYS.search(m)
        if hit:
            prefix = hit.group(2)
            if any(k.startswith(prefix + ".") for k in file_tensors):
                problems.append(m)
        elif _BAD_MESSAGE.search(m):
            problems.append(m)
    if problems:
        _drop_adapter(pipe, adapter_name)
        raise LoraLoadError("LoRA did not load cleanly: " + " | ".join(problems), path=path)
    return LoraLoadReport(str(path), adapter_name, tuple(sorted(injected)), tuple(messages))


def _drop_adapter(pipe, adapter_name: str) -> None:
    """Remove a half-loaded adapter, keeping any adapter loaded before it."""
    try:
        pipe.delete_adapters([adapter_name])
    except Exception:  # noqa: BLE001 - fall back to removing every LoRA layer
        with contextlib.suppress(Exception):
            pipe.unload_lora_weights()


# ---------------------------------------------------------------- backend


class TorchBackend:
    """diffusers SDXL pipeline from a local folder, optionally with a LoRA."""

    name = "torch"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        import importlib.util

        for mod in ("torch", "diffusers", "transformers", "peft", "safetensors"):
            if importlib.util.find_spec(mod) is None:
                return False, f"{mod} is not installed"
        return True, ""

    def __init__(self, pipeline_dir: str | Path, lora: str | Path | None = None, device: str = "cpu",
                 dtype=None, adapter_name: str = "parity"):
        ok, why = self.is_available()
        if not ok:
            raise LoraParityError(why)
        from diffusers import StableDiffusionXLPipeline

        self.pipeline_dir = Path(pipeline_dir)
        self.device = torch.device(device)
        self.dtype = torch.float32 if dtype is None else dtype
        if not (self.pipeline_dir / "model_index.json").is_file():
            raise LoraParityError("not a diffusers pipeline folder (no model_index.json)", path=self.pipeline_dir)
        kwargs = {"local_files_only": True}
        if self.dtype != torch.float32:
            kwargs["torch_dtype"] = self.dtype
        with warnings.catch_warnings():
            # diffusers 0.42 deprecates ``torch_dtype=`` for ``dtype=``, which older releases lack
            warnings.simplefilter("ignore", FutureWarning)
            pipe = StableDiffusionXLPipeline.from_pretrained(str(self.pipeline_dir), **kwargs)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.lora_report: LoraLoadReport | None = None
        if lora is not None:
            self.load_lora(lora, adapter_name)

    @classmethod
    def from_pipe(cls, pipe, pipeline_dir: str | Path, dtype=None, device: str = "cpu") -> "TorchBackend":
        """Wrap an already built pipeline (e.g. one whose other components are not loaded)."""
        self = cls.__new__(cls)
        self.pipeline_dir = Path(pipeline_dir)
        self.device = torch.device(device)
        self.dtype = torch.float32 if dtype is None else dtype
        self.pipe = pipe
        self.lora_report = None
        return self

    # ------------------------------------------------------------ helpers

    def load_lora(self, path: str | Path, adapter_name: str = "parity") -> LoraLoadReport:
        self.lora_report = load_lora_checked(self.pipe, path, adapter_name)
        return self.lora_report

    def _t(self, x, dtype=None):
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        return t.to(self.device, self.dtype if dtype is None else dtype)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    # ------------------------------------------------------------ text encoders

    def token_ids(self, prompt: str) -> dict[str, np.ndarray]:
        """``{"input_ids": ..., "input_ids_2": ...}`` for the tokenizers this pipeline has (refiner: only _2)."""
        out = {}
        for key, tok in (("input_ids", self.pipe.tokenizer), ("input_ids_2", getattr(self.pipe, "tokenizer_2", None))):
            if tok is not None:
                enc = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="np")
                out[key] = enc.input_ids.astype(np.int64)
        return out

    def tokenize(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        ids = []
        for tok in (self.pipe.tokenizer, self.pipe.tokenizer_2):
            enc = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="np")
            ids.append(enc.input_ids.astype(np.int64))
        return ids[0], ids[1]

    def _encode(self, prompt, input_ids, input_ids_2):
        pipe = self.pipe
        if not hasattr(pipe, "text_encoder_2"):  # SD 1.x / 2.x: the last hidden state, no pooled embedding
            if input_ids is None:
                input_ids = self.token_ids(prompt)["input_ids"]
            embeds = pipe.text_encoder(self._t(input_ids, torch.long), output_hidden_states=True)[0]
            return embeds.to(self.dtype), None
        if input_ids is None and input_ids_2 is None:
            if prompt is None:
                raise ValueError("encode_prompt needs a prompt or token ids")
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            return embeds, pooled
        if input_ids_2 is None or (input_ids is None and pipe.text_encoder is not None):
            raise ValueError("give token ids for every tokenizer of the pipeline")
        # the pipeline's encode_prompt for already tokenized input (clip_skip=None)
        embeds = []
        pooled = None
        for ids, te in ((input_ids, pipe.text_encoder), (input_ids_2, pipe.text_encoder_2)):
            if te is None:  # the refiner has only the OpenCLIP encoder
                continue
            out = te(self._t(ids, torch.long), output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        embeds = torch.cat(embeds, dim=-1).to(self.dtype)
        return embeds, pooled.to(self.dtype)

    @_no_grad
    def encode_prompt(self, prompt: str | None = None, *, input_ids=None, input_ids_2=None,
                      as_numpy: bool = True):
        """``(prompt_embeds (1,77,ctx), pooled (1,proj))`` via ``pipe.encode_prompt`` (or the same for ids)."""
        embeds, pooled = self._encode(prompt, input_ids, input_ids_2)
        if as_numpy:
            return to_numpy(embeds, np.float32), None if pooled is None else to_numpy(pooled, np.float32)
        return embeds, pooled

    @_no_grad
    def text_encoder_activations(self, prompt: str | None = None, *, input_ids=None,
                                 input_ids_2=None) -> Activations:
        """Both encoders' ``hidden_states.{i}`` (0 = embeddings, i = layer i), final LN, pooled / projection.

        Names: ``text_encoder.hidden_states.0`` ... ``text_encoder.last_hidden_state``,
        ``text_encoder.pooler_output``; ``text_encoder_2.hidden_states.*``,
        ``text_encoder_2.last_hidden_state``, ``text_encoder_2.text_embeds``.  Captured with
        forward hooks on the two encoders while the pipeline encodes the prompt.
        """
        outs: dict[str, Any] = {}
        handles = []
        comps = [c for c in ("text_encoder", "text_encoder_2") if getattr(self.pipe, c, None) is not None]
        for comp in comps:
            def hook(_m, _i, output, comp=comp):
                outs[comp] = output
            handles.append(getattr(self.pipe, comp).register_forward_hook(hook))
        try:
            self._encode(prompt, input_ids, input_ids_2)
        finally:
            for h in handles:
                h.remove()
        acts = Activations()
        for comp in comps:
            out = outs[comp]
            for i, h in enumerate(out.hidden_states):
                acts.add(f"{comp}.hidden_states.{i}", to_numpy(h), comp)
            acts.add(f"{comp}.last_hidden_state", to_numpy(out.last_hidden_state), comp)
            pooled_name = "pooler_output" if comp == "text_encoder" else "text_embeds"
            acts.add(f"{comp}.{pooled_name}", to_numpy(out[pooled_name]), comp)
        return acts

    # ------------------------------------------------------------ UNet

    def add_time_ids(self, original_size=(32, 32), crops_coords_top_left=(0, 0), target_size=(32, 32),
                     as_numpy: bool = True, *, aesthetic: tuple[float, float] | None = None,
                     pooled_dim: int | None = None):
        """Time ids exactly as the pipeline builds them: ``(1, 6)`` for the base pipeline,
        ``(1, 5)`` (original size, crop, aesthetic score) for the refiner's img2img pipeline.

        ``pooled_dim`` stands in for ``text_encoder_2.config.projection_dim`` when the text
        encoders are not loaded (as diffusers itself does with ``pooled_prompt_embeds``).
        """
        te2 = getattr(self.pipe, "text_encoder_2", None)
        proj = int(te2.config.projection_dim) if te2 is not None else int(pooled_dim)
        orig, crop, target = tuple(original_size), tuple(crops_coords_top_left), tuple(target_size)
        if getattr(self.pipe.config, "requires_aesthetics_score", None) is not None:  # img2img signature
            score, negative = aesthetic if aesthetic is not None else (6.0, 2.5)
            ids, _ = self.pipe._get_add_time_ids(orig, crop, target, score, negative, orig, crop, target,
                                                 dtype=self.dtype, text_encoder_projection_dim=proj)
        else:
            ids = self.pipe._get_add_time_ids(orig, crop, target, dtype=self.dtype,
                                              text_encoder_projection_dim=proj)
        return to_numpy(ids, np.float32) if as_numpy else ids.to(self.device)

    def unet_hook_names(self) -> list[str]:
        return hook_names(self.unet, UNET_HOOK_PATTERNS)

    @_no_grad
    def unet_activations(self, latents, timestep, prompt_embeds, pooled, add_time_ids) -> Activations:
        """One UNet forward on raw (already scheduler-scaled) latents; hooked outputs as float64.

        Names are ``unet.`` + diffusers module names (see :data:`UNET_HOOK_PATTERNS`),
        in the order the modules run.
        """
        x = self._t(latents)
        t = torch.as_tensor(timestep, dtype=torch.float32, device=self.device)
        cond = None if pooled is None else {"text_embeds": self._t(pooled), "time_ids": self._t(add_time_ids)}
        with capture(self.unet, self.unet_hook_names(), prefix="unet.") as got:
            self.unet(x, t, encoder_hidden_states=self._t(prompt_embeds), added_cond_kwargs=cond,
                      return_dict=False)
        acts = Activations()
        for name, value in got.items():
            acts.add(name, value, "unet")
        return acts

    # ------------------------------------------------------------ VAE

    def vae_hook_names(self) -> list[str]:
        return hook_names(self.vae, VAE_HOOK_PATTERNS)

    @_no_grad
    def vae_decode_activations(self, latents) -> Activations:
        """Decode ``latents`` as the pipeline does (mean/std if configured, / scaling_factor)."""
        vae = self.vae
        z = self._t(latents)
        cfg = vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(z)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(z)
            z = z * std / cfg.scaling_factor + mean
        else:
            z = z / cfg.scaling_factor
        with capture(vae, self.vae_hook_names(), prefix="vae.") as got:
            vae.decode(z, return_dict=False)
        acts = Activations()
        for name, value in got.items():
            acts.add(name, value, "vae")
        return acts

    # ------------------------------------------------------------ whole pipeline

    @_no_grad
    def generate(self, prompt: str, latents, steps: int = 2, guidance: float = 5.0) -> np.ndarray:
        """``pipe(prompt, latents=...)``; the first image as ``uint8 (H, W, 3)`` (diffusers' rounding)."""
        from lora_parity.sampling import to_uint8

        return to_uint8(self.generate_float(prompt, latents, steps, guidance))

    @_no_grad
    def generate_float(self, prompt: str, latents, steps: int = 2, guidance: float = 5.0,
                       progress: bool = False) -> np.ndarray:
        """``pipe(prompt, latents=...)`` with ``output_type="np"``: the first image as float32 (H, W, 3) in [0, 1].

        The pipeline runs untouched except that an installed invisible-watermark encoder is
        switched off for the call (the MindSpore side has none); ``progress`` shows
        diffusers' own per-step bar.  Sets ``self.last_seconds_per_step``.  Convert with
        :func:`lora_parity.sampling.to_uint8`.
        """
        import time

        lat = self._t(latents)
        scale = self.pipe.vae_scale_factor
        h, w = lat.shape[-2] * scale, lat.shape[-1] * scale
        watermark = getattr(self.pipe, "watermark", None)
        self.pipe.watermark = None
        self.pipe.set_progress_bar_config(disable=not progress)
        ends: list[float] = []

        def on_step_end(_pipe, _i, _t, kwargs):
            ends.append(time.perf_counter())
            return kwargs

        try:
            t0 = time.perf_counter()
            images = self.pipe(prompt, latents=lat, num_inference_steps=int(steps), guidance_scale=float(guidance),
                               height=h, width=w, output_type="np", callback_on_step_end=on_step_end).images
        finally:
            self.pipe.watermark = watermark
            self.pipe.set_progress_bar_config(disable=True)
        # seconds per denoising step: between step ends (the first step also pays prompt encoding)
        self.last_seconds_per_step = ((ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1
                                      else (ends[-1] - t0 if ends else float("nan")))
        return np.asarray(images[0], dtype=np.float32)
