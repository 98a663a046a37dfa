"""``random:NAME[:SEED]``: a complete diffusers pipeline folder with generated weights, made once.

Lets both backends run a full-size SDXL base or refiner (or the tiny ones) with no
download.  The tensor list (names, shapes) comes from the diffusers/transformers
models built on the meta device from the built-in configs, so the folder holds
exactly what ``from_pretrained`` loads.  Values come from numpy only, one RNG per
tensor seeded with ``(seed, crc32(component-prefixed name))``, so the order of
generation never matters and two machines write identical bytes.

INIT RULE (:func:`init_spec`; version ``INIT_VERSION``), chosen so activations stay
finite and non-trivial through every block of the full-depth UNet, both text
encoders and the VAE:

* norm weights 1, norm biases 0 (every 1-D ``weight`` is a norm scale in these models);
* Linear / Conv weights ~ N(0, (gain / sqrt(fan_in))^2), fan_in = prod(shape[1:]), gain 1:
  unit-variance inputs give unit-variance outputs;
* except the last projection of every residual branch (UNet/VAE resnet ``conv2``,
  attention ``to_out.0``, ``ff.net.2``, transformer ``proj_out``, CLIP ``out_proj`` and
  ``fc2``), gain ``RESIDUAL_GAIN`` = 0.5, so the residual stream grows slowly with depth
  (each branch adds ~1/4 of a unit of variance) instead of doubling per block;
* other biases ~ N(0, 0.02^2); token / position embeddings ~ N(0, 0.02^2) (CLIP's own init);
  ``text_projection`` ~ N(0, 1/fan_in) (the general rule).

Values are drawn in float32 and rounded to fp16 for storage (``*.fp16.safetensors``, the
diffusers "fp16" variant).  Folders are written to ``<dir>.tmp-<pid>`` and renamed, so a
reader never sees a partial one; ``lora-parity-random.json`` records spec, seed, rule.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import threading
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple
from pathlib import Path

import numpy as np

from lora_parity.bases.configs import PipelineConfigs, meta_state_shapes, write_skeleton
from lora_parity.bases.flow_configs import FlowPipelineConfigs, flow_state_shapes, write_flow_skeleton
from lora_parity.bases.sources import write_component_weights

INIT_VERSION = 3  # 2: UNet weights in 1 GiB shards; 3: CLIP-L names with "text_model." (transformers 4 / mindone)
VARIANT = "fp16"
RESIDUAL_GAIN = 0.5
BIAS_STD = 0.02
EMBEDDING_STD = 0.02
MARKER = "lora-parity-random.json"
# What "finite and non-trivial" means for the rule: every block's output RMS, for unit-variance
# latents and the generated weights, lies within this range (checked on the tiny models in the tests).
ACTIVATION_RMS_RANGE = (1e-2, 1e2)
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "transformer": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model", "text_encoder_3": "model"}

# residual-branch outputs: UNet / VAE / CLIP as above; SD3 / Flux context stream (to_add_out, ff_context);
# T5's attention output (o) and feed-forward output (wo)
_RESIDUAL_OUT = re.compile(r"(\.conv2|\.to_out\.0|\.to_add_out|\.ff\.net\.2|\.ff_context\.net\.2|\.proj_out"
                           r"|\.out_proj|\.fc2|SelfAttention\.o|DenseReluDense\.wo)\.weight$")
_EMBEDDING = re.compile(r"(token_embedding|position_embedding)\.weight$")


# T5 shares one embedding between ``shared`` and ``encoder.embed_tokens``; released files hold both, equal
_TIED = {"encoder.embed_tokens.weight": "shared.weight"}


class InitSpec(NamedTuple):
    """A tensor's values are ``mean + std * N(0, 1)``."""

    mean: float
    std: float


def init_spec(name: str, shape: tuple[int, ...]) -> InitSpec:
    """The init rule (see the module docstring) for one diffusers/transformers parameter."""
    module, _, leaf = name.rpartition(".")
    if len(shape) == 1 and leaf == "weight":
        return InitSpec(1.0, 0.0)
    if leaf == "bias":
        return InitSpec(0.0, 0.0 if "norm" in module.rpartition(".")[2] else BIAS_STD)
    if _EMBEDDING.search(name):
        return InitSpec(0.0, EMBEDDING_STD)
    gain = RESIDUAL_GAIN if _RESIDUAL_OUT.search(name) else 1.0
    return InitSpec(0.0, gain / math.sqrt(math.prod(shape[1:])))


def random_tensor(seed: int, name: str, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
    """The fp16 values of one tensor: depends on (seed, name, shape) only.  Written into ``out`` (float16,
    ``shape``) when given, and returned."""
    spec = init_spec(name, shape)
    out = np.empty(shape, np.float16) if out is None else out
    if spec.std == 0.0:
        out[...] = spec.mean
        return out
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    x = _scratch(math.prod(shape)).reshape(shape)
    rng.standard_normal(dtype=np.float32, out=x)  # the values standard_normal(shape) returns, in place
    x *= np.float32(spec.std)
    if spec.mean:
        x += np.float32(spec.mean)
    np.copyto(out, x, casting="same_kind")  # rounded to float16 as astype rounds
    return out


_SCRATCH = threading.local()


def _scratch(n: int) -> np.ndarray:
    """``n`` float32 values of this thread's draw buffer, kept from tensor to tensor (grown to the largest).

    Why: the first touch of a fresh array's pages costs about as much as drawing the normals into it here
    (measured on one core: 50 million float32 normals, 1.0-1.1 s into a new array, 0.53 s into a reused one;
    the float16 copy written out stays a fresh array, it lives until the writer has it).  The buffer dies with
    the generator thread, after the component is written."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < n:
        buf = _SCRATCH.buf = np.empty(max(n, 1), np.float32)
    return buf[:n]


def write_component(out_dir: Path, component: str, cfg: dict, seed: int, shapes: dict | None = None) -> None:
    """Stream one component's generated weights into ``<out_dir>/<component>/<file>.fp16.safetensors``."""
    shapes = meta_state_shapes(component, cfg) if shapes is None else shapes
    entries = [(k, "F16", s) for k, s in shapes.items()]
    jobs = [(seed, f"{component}.{_TIED.get(k, k) if _TIED.get(k) in shapes else k}", s) for k, s in shapes.items()]
    threads = generator_threads()
    with ThreadPoolExecutor(threads) as pool:
        write_component_weights(out_dir / component, WEIGHT_FILES[component], VARIANT, entries,
                                _in_order(pool, jobs, ahead=2 * threads), {"format": "pt"})


def generator_threads() -> int:
    """Threads drawing tensors at once: the cores this process may use, or ``$LORA_PARITY_THREADS``.

    Why: drawing the normals is nearly all of the time (measured: SDXL base, 3.5 billion values, 55 s on one
    thread, 40 s on this machine's two) and numpy's generators release the GIL while they fill an array.
    Every tensor has its own generator, so the bytes never depend on how many threads drew them."""
    from lora_parity.sides.threads import cores, thread_limit

    return thread_limit() or cores()


def _in_order(pool: ThreadPoolExecutor, jobs: list[tuple], ahead: int):
    """``random_tensor(*job)`` for each job, in order, at most ``ahead`` drawn before they are written
    (memory ~ a few tensors).

    The float16 arrays come from ``ahead + 1`` buffers used again and again (see :func:`_scratch` for why): the
    consumer (the safetensors writer) is done with an array once it asks for the next one, so that array's buffer
    takes a later tensor."""
    pending: deque = deque()
    free: list[np.ndarray] = []

    def submit(job: tuple) -> None:
        n = math.prod(job[2])
        buf = free.pop() if free else None
        if buf is None or buf.size < n:
            buf = np.empty(max(n, 1), np.float16)
        pending.append((pool.submit(random_tensor, *job, out=buf[:n].reshape(job[2])), buf))

    def take():
        fut, buf = pending.popleft()
        yield fut.result()
        free.append(buf)  # resumed: the writer has written it

    for job in jobs:
        submit(job)
        if len(pending) > ahead:
            yield from take()
    while pending:
        yield from take()


def folder_name(cfgs: PipelineConfigs, seed: int) -> str:
    return f"{cfgs.name}-seed{seed}-v{INIT_VERSION}"


def ensure_random_pipeline(cache: Path, cfgs: PipelineConfigs, seed: int, spec: str, *,
                           progress: bool = False) -> Path:
    """``<cache>/random/<name>-seed<S>-v1/``, generated on first use, reused afterwards."""
    final = Path(cache) / "random" / folder_name(cfgs, seed)
    if (final / MARKER).is_file():
        return final
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)  # only ever renamed complete: without its marker it is debris
    if progress and cfgs.real_size:
        print(f"lora-parity: generating {spec} into {final} once (a minute or two)", file=sys.stderr, flush=True)
    try:
        flow = isinstance(cfgs, FlowPipelineConfigs)
        (write_flow_skeleton if flow else write_skeleton)(tmp, cfgs)
        for comp, cfg in cfgs.components().items():
            write_component(tmp, comp, cfg, seed, flow_state_shapes(cfgs, comp) if flow else None)
        marker = {"spec": f"random:{cfgs.name}:{seed}", "model": cfgs.name, "seed": seed, "version": INIT_VERSION,
                  "variant": VARIANT, "init": (__doc__ or "").split("INIT RULE", 1)[-1].strip()}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, allow_nan=False) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: keep theirs
            if not (final / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
