"""Replay: every aligned block run again on the reference's exact inputs, for diffusers-named modules.

A chained comparison judges each block by the error it has accumulated from everything upstream,
so a fault far upstream (or a loose numerical point such as MindSpore's float32 ``exp`` in the
timestep sinusoid) shows in every later block, and a bound loose enough for the accumulation hides
small faults.  Replay measures what a block *alone* adds: while the model runs once more, a forward
hook on each aligned module records the module's own output ("local") and hands the reference's
output of that module to the rest of the network.  The next block therefore starts from exactly
the reference's values, skip connections included (diffusers' down blocks collect the hook's
returned tensors as the up blocks' residuals), and every aligned block is replayed in one forward.

The same code serves diffusers (torch) and mindone.diffusers (MindSpore): both expose the same
module names and forward hooks that may replace an output; :class:`Framework` holds the few calls
that differ.  The port (SGM cells) replays through its recorder instead (``port.layers``).

Point names are the aligned diffusers names (``unet.down_blocks.1.attentions.0``,
``text_encoder.hidden_states.3``, ``vae.decoder.up_blocks.0``): :func:`point_modules` maps them to
modules of one component.  The LoRA's own effect is measured by replaying again with the adapters
disabled (:func:`adapters_enabled`), on the same inputs.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from lora_parity.parity.align import timestep_suffix
from lora_parity.parity.verdict import LOCAL, NOLORA  # noqa: F401  (a block on the reference's inputs, with and
# without the LoRA: the LoRA's effect is LOCAL - NOLORA)

# text encoder point -> module of the encoder (the pooled output is gathered, not a module: see below)
_TEXT = (
    (re.compile(r"hidden_states\.0"), lambda m: "text_model.embeddings"),
    (re.compile(r"hidden_states\.(\d+)"), lambda m: f"text_model.encoder.layers.{int(m.group(1)) - 1}"),
    (re.compile(r"last_hidden_state"), lambda m: "text_model.final_layer_norm"),
    (re.compile(r"text_embeds"), lambda m: "text_projection"),
)


@dataclass(frozen=True)
class Framework:
    """The calls that differ between torch and MindSpore modules."""

    modules: Callable[[Any], dict]  # root -> {name: submodule}
    is_tensor: Callable[[Any], bool]
    to_numpy: Callable[[Any], np.ndarray]  # float64
    like: Callable[[np.ndarray, Any], Any]  # numpy -> a tensor with the dtype / device of the given one
    ids: Callable[[np.ndarray], Any]  # token ids -> an int64 tensor
    scalar: Callable[[float], Any]  # a float32 0-d tensor (the UNet's timestep)
    no_grad: Callable[[], Any]  # a context manager


def torch_framework() -> Framework:
    import torch

    return Framework(
        modules=lambda root: dict(root.named_modules()),
        is_tensor=lambda x: isinstance(x, torch.Tensor),
        to_numpy=lambda t: t.detach().to("cpu", torch.float64).numpy(),
        like=lambda a, t: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(t.device, t.dtype),
        ids=lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)),
        scalar=lambda t: torch.as_tensor(float(t), dtype=torch.float32),
        no_grad=torch.no_grad,
    )


def mindspore_framework() -> Framework:
    import mindspore as ms

    return Framework(
        modules=lambda root: dict(root.cells_and_names()),
        is_tensor=lambda x: isinstance(x, ms.Tensor),
        to_numpy=lambda t: t.astype(ms.float32).asnumpy().astype(np.float64),
        like=lambda a, t: ms.Tensor(np.ascontiguousarray(a, dtype=np.float32)).astype(t.dtype),
        ids=lambda a: ms.Tensor(np.ascontiguousarray(a, dtype=np.int64)),
        scalar=lambda t: ms.Tensor(float(t), ms.float32),
        no_grad=contextlib.nullcontext,
    )


def point_modules(points, component: str) -> dict[str, str]:
    """``{point: module name}`` for the aligned points of one component (``unet``, ``vae``,
    ``text_encoder``, ``text_encoder_2``); points of other components and the timestep suffix
    ``@tT`` are the caller's business (one replay per timestep)."""
    out = {}
    head = component + "."
    for p in points:
        if not p.startswith(head):
            continue
        rest = p[len(head):]
        if component in ("unet", "vae"):
            out[p] = rest
            continue
        for rx, name in _TEXT:
            m = rx.fullmatch(rest)
            if m:
                out[p] = name(m)
                break
    return out


def _first(fw: Framework, output):
    if fw.is_tensor(output):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output:
        return _first(fw, output[0])
    raise TypeError(f"no tensor in a module output of type {type(output).__name__}")


def _replace_first(fw: Framework, output, new):
    """``output`` with its main tensor replaced by ``new`` (tuples, lists and ModelOutputs kept)."""
    if fw.is_tensor(output):
        return new
    if isinstance(output, dict):  # diffusers BaseOutput / transformers ModelOutput
        key = next(iter(output.keys()))
        output[key] = _replace_first(fw, output[key], new)
        return output
    if isinstance(output, tuple):
        return (_replace_first(fw, output[0], new),) + tuple(output[1:])
    if isinstance(output, list):
        return [_replace_first(fw, output[0], new)] + list(output[1:])
    raise TypeError(f"cannot replace the tensor in a module output of type {type(output).__name__}")


@contextlib.contextmanager
def replaying(fw: Framework, root, modules: dict[str, str], ref: dict[str, np.ndarray], *,
              suffix: str = "", inputs: dict[str, str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """While the ``with`` block runs ``root``: each module of ``modules`` (point -> module name) records
    its output under ``point + suffix`` and passes the reference's ``ref[point + suffix]`` on instead.

    ``inputs``: module name -> ref key whose value replaces the module's first positional input
    (a block whose input the network computes outside any aligned module, e.g. the UNet's
    ``add_embedding`` fed from the time-id sinusoid).  Yields the local outputs, float64.
    """
    subs = fw.modules(root)
    local: dict[str, np.ndarray] = {}
    handles = []

    def record(key: str):
        def hook(_mod, _args, output):
            out = _first(fw, output)
            local[key] = fw.to_numpy(out)
            if key in ref:
                if tuple(ref[key].shape) != tuple(out.shape):
                    return None  # a shape mismatch is reported by the judge; the network runs on its own values
                return _replace_first(fw, output, fw.like(ref[key], out))
            return None
        return hook

    def substitute(key: str):
        def pre(_mod, args):
            if key in ref and args and tuple(ref[key].shape) == tuple(args[0].shape):
                return (fw.like(ref[key], args[0]),) + tuple(args[1:])
            return None
        return pre

    try:
        for point, name in modules.items():
            if name not in subs and name.startswith("text_model.") and name[len("text_model."):] in subs:
                name = name[len("text_model."):]  # transformers 5's CLIPTextModel has no text_model level
            if name not in subs:
                raise KeyError(f"{type(root).__name__} has no module {name!r} (aligned point {point})")
            handles.append(subs[name].register_forward_hook(record(point + suffix)))
        for name, key in (inputs or {}).items():
            if name in subs:
                handles.append(subs[name].register_forward_pre_hook(substitute(key)))
        yield local
    finally:
        for h in handles:
            h.remove()


def lora_layers(fw: Framework, root) -> list:
    """The PEFT LoRA layers of ``root`` (peft's and mindone.peft's ``BaseTunerLayer`` alike)."""
    return [m for m in fw.modules(root).values() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")
            and not hasattr(m, "peft_config")]


@contextlib.contextmanager
def adapters_disabled(fw: Framework, *roots) -> Iterator[int]:
    """Every LoRA layer of ``roots`` computes its base layer only, until the block ends; yields the count."""
    layers = [m for r in roots if r is not None for m in lora_layers(fw, r)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.enable_adapters(True)


def pooled_point(component: str) -> str | None:
    """The pooled output an encoder hands on, gathered from the last hidden state (not a module)."""
    return {"text_encoder": "text_encoder.pooler_output"}.get(component)


class DiffusersReplay:
    """One side's replay passes over diffusers-named modules (diffusers, or mindone.diffusers).

    The references are the request's (``SideRequest.refs``: the MindSpore side, or a low-precision PyTorch
    run, replays on PyTorch's fp32 outputs) or, for the fp32 reference itself, its own aligned outputs: its
    replay with the LoRA then reproduces its chained run (a check of the replay's wiring), and without the
    LoRA gives the LoRA's effect that the other side's effect is judged against.  Each pass is recorded
    under ``LOCAL`` and, when the request has a LoRA, again with the adapters off under ``NOLORA``.
    """

    def __init__(self, fw: Framework, req, result):
        from lora_parity.parity.align import alignment_for

        self.fw, self.req, self.result = fw, req, result
        self.points = [a.diffusers for a in alignment_for(req.pipeline_dir, [None], "diffusers")]
        self.given = req.refs()
        self.lora = bool(req.lora)

    def _ref(self) -> dict:
        return dict(self.given or self.result.acts)

    def _run(self, one_pass, roots, with_nolora: bool = True) -> None:
        import time

        t0 = time.perf_counter()
        with self.fw.no_grad():
            self.result.acts.update({LOCAL + k: v for k, v in one_pass().items()})
            if self.lora and with_nolora:
                with adapters_disabled(self.fw, *roots):
                    self.result.acts.update({NOLORA + k: v for k, v in one_pass().items()})
        sec = self.result.meta.setdefault("seconds", {})
        sec["replay"] = sec.get("replay", 0.0) + time.perf_counter() - t0

    def text(self, encoders: dict, ids: dict) -> None:
        """Both text encoders (``CLIPTextModel`` / ``...WithProjection``, called as the pipeline calls them)."""
        ref = self._ref()

        def one_pass():
            local = {}
            for comp, key in (("text_encoder", "input_ids"), ("text_encoder_2", "input_ids_2")):
                te = encoders.get(comp)
                if te is None or key not in ids:
                    continue
                with replaying(self.fw, te, point_modules(self.points, comp), ref) as got:
                    out = te(self.fw.ids(ids[key]), return_dict=False)
                local.update(got)  # out: (last | text_embeds, pooled | last, hidden_states)
                pooled = pooled_point(comp)
                if pooled in self.points:
                    local[pooled] = self.fw.to_numpy(out[1])
            return local  # the prompt embedding only concatenates replayed outputs: judged chained

        self._run(one_pass, [m for m in encoders.values() if m is not None])

    def unet(self, unet, x, time_ids, tproj: np.ndarray | None) -> None:
        """One UNet forward per timestep on the reference's context and pooled embedding; ``add_embedding``
        gets the reference's input, so only the time-id sinusoid stays this side's (its own point).
        SD 1.x / 2.x (``time_ids`` None): the context is the UNet's only conditioning."""
        ref = self._ref()
        ctx = self.fw.like(ref["conditioning.prompt_embeds"], x)
        modules = point_modules(self.points, "unet")
        if time_ids is None:
            def sd_pass():
                local = {}
                for t in self.req.timesteps:
                    sfx = timestep_suffix(t, self.req.timesteps)
                    with replaying(self.fw, unet, modules, ref, suffix=sfx) as got:
                        unet(x, self.fw.scalar(t), encoder_hidden_states=ctx, return_dict=False)
                    local.update(got)
                return local

            self._run(sd_pass, [unet])
            return
        pooled = np.asarray(ref["text_encoder_2.text_embeds"], np.float64)
        text_embeds = self.fw.like(pooled, x)

        def one_pass():
            local = {"conditioning.add_embedding_input": np.concatenate([pooled, tproj], axis=-1)}
            for t in self.req.timesteps:
                sfx = timestep_suffix(t, self.req.timesteps)
                with replaying(self.fw, unet, modules, ref, suffix=sfx,
                               inputs={"add_embedding": "conditioning.add_embedding_input"}) as got:
                    unet(x, self.fw.scalar(t), encoder_hidden_states=ctx,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)
                local.update(got)
            return local

        self._run(one_pass, [unet])

    def vae(self, vae, z) -> None:
        """The decoder on the unscaled latents ``z`` (no LoRA targets the VAE: no pass without it)."""
        ref = self._ref()
        modules = point_modules(self.points, "vae")

        def one_pass():
            with replaying(self.fw, vae, modules, ref) as got:
                vae.decode(z, return_dict=False)
            return got

        self._run(one_pass, [vae], with_nolora=False)
