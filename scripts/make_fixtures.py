#!/usr/bin/env python
"""Write ``fixtures/``: small files made by the real tools, for tests/test_fixtures_dir.py.

    .venv/bin/python scripts/make_fixtures.py [--out DIR] [--only NAME ...] [--no-report]

Every file is written by the tool whose output it stands for, on the built-in tiny SDXL
(:func:`lora_parity.convert.tiny.tiny_layout`, the pipeline of :mod:`lora_parity.fixtures.tiny_pipeline`):

* ``mindone_lora_{f32,f16,bf16,f64}.ckpt``: ``mindspore.save_checkpoint`` of a list of
  ``{"name", "data"}`` (what MindONE's ``save_checkpoint(..., only_save_lora=True)`` hands it),
  SGM names; MindSpore itself casts the float32 values to each dtype.
* ``diffusers_peft.safetensors``: ``StableDiffusionXLPipeline.save_lora_weights`` after PEFT
  injected LoRAs (``add_adapter(LoraConfig(r=4, lora_alpha=8))``) into the tiny UNet and both
  text encoders; state dicts from ``peft.get_peft_model_state_dict`` and adapter metadata from
  ``diffusers.training_utils._collate_lora_metadata``, as diffusers' newer training scripts pass them.
* ``diffusers_sdxl_train_script.safetensors``: the same LoRA saved the way diffusers'
  ``train_dreambooth_lora_sdxl.py`` / ``train_text_to_image_lora_sdxl.py`` save it:
  ``convert_state_dict_to_diffusers(get_peft_model_state_dict(model))``, no metadata.
* ``kohya_sdxl.safetensors``: sd-scripts' ``LoRANetwork`` layout rebuilt here (sd-scripts is not
  installed; names, 0-d alphas, dtype cast and ``ss_*``/``sshs_*``/``modelspec.*`` metadata as
  ``networks/lora.py`` and ``train_network.py`` write them), saved with ``safetensors.torch.save_file``.
* ``sd_xl_{base,refiner}_1.0.names.tsv``: ``name<TAB>shape<TAB>dtype`` of the official single
  files, derived from :func:`lora_parity.bases.single_file.expected_params` (not read from them).
* ``report.json``: ``lora-parity compare`` on ``lora-parity fixture`` (2 steps), kept as written.

Deterministic: fixed seeds everywhere; the script re-runs itself with ``PYTHONHASHSEED=0``
because PEFT keeps ``target_modules`` as a set and diffusers writes it as ``list(set)`` into
``lora_adapter_metadata`` (string-hash order).  Two runs give identical bytes for every file
except ``report.json`` (seconds, RSS and timings change from run to run).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RANK = 4
PEFT_ALPHA = 8  # alpha != rank: scale 2
KOHYA_ALPHA = 8.0
MS_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64"}
NAME_LISTS = {"sd_xl_base_1.0.names.tsv": "sdxl-base", "sd_xl_refiner_1.0.names.tsv": "sdxl-refiner"}
# what MindONE's gm LoRA covers in the text encoders: CLIP-L self-attention, bigG attn.out_proj
# (bigG's fused in_proj is a raw parameter there, not a Dense)
MINDONE_TE_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "attn.out_proj")
PEFT_TARGETS = {"unet": ["to_k", "to_q", "to_v", "to_out.0"],  # diffusers' SDXL LoRA scripts
                "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"],
                # bigG: out_proj only, so that a MindONE .ckpt can hold it (independent q/k/v LoRAs
                # cannot be fused into bigG's in_proj exactly); the training scripts' default is q/k/v/out
                "text_encoder_2": ["out_proj"]}
SD_SCRIPTS_TE_MODULES = ("CLIPAttention", "CLIPMLP")  # LoRANetwork.TEXT_ENCODER_TARGET_REPLACE_MODULE
SD_SCRIPTS_UNET_MODULES = ("Transformer2DModel",)  # LoRANetwork.UNET_TARGET_REPLACE_MODULE
SESSION_SEED = 20240601
FIXED_START = 1700000000  # ss_training_started_at / modelspec.date: fixed, for identical bytes


def _ensure_hash_seed() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])


# ------------------------------------------------------------------ MindONE .ckpt (MindSpore)

def mindone_modules() -> list[str]:
    """SGM module names MindONE's gm LoRA wraps on the tiny layout (UNet attention + TE attention)."""
    from lora_parity.convert.keymap import keymap_for
    from lora_parity.convert.layout import tiny_layout

    km = keymap_for(tiny_layout())
    unet = [e.sgm for e in km.attention_entries()]
    te = [e.sgm for e in km.lora_entries() if e.component != "unet" and e.sgm.endswith(MINDONE_TE_LEAVES)]
    return unet + te


def write_mindone(out: Path) -> list[Path]:
    import mindspore as ms

    from lora_parity.convert.formats import tensors_for
    from lora_parity.fixtures.synthetic import make_lora
    from lora_parity.convert.layout import tiny_layout

    lora = make_lora(tiny_layout(), rank=RANK, modules=mindone_modules(), dtype="F32", seed=7)
    f32 = {k: t.data for k, t in tensors_for(lora, "ms")[0].items()}  # interleaved A, B per module
    written = []
    for tag, dtype in MS_DTYPES.items():
        params = [{"name": k, "data": ms.Tensor(v).astype(getattr(ms, dtype))} for k, v in f32.items()]
        path = out / f"mindone_lora_{tag}.ckpt"
        path.unlink(missing_ok=True)  # MindSpore writes its checkpoints read-only (0400)
        ms.save_checkpoint(params, str(path))
        written.append(path)
    return written


# ------------------------------------------------------------------ diffusers (PEFT)

def _peft_models(seed: int = 0):
    """Tiny UNet + text encoders with PEFT LoRAs injected, lora weights drawn from a seeded generator."""
    import torch
    from peft import LoraConfig

    from lora_parity.fixtures.tiny_pipeline import build_tiny_components

    comps = build_tiny_components(seed)
    models = {name: comps[name] for name in PEFT_TARGETS}
    gen = torch.Generator().manual_seed(1234)
    for name, model in models.items():
        model.add_adapter(LoraConfig(r=RANK, lora_alpha=PEFT_ALPHA, init_lora_weights="gaussian",
                                     target_modules=PEFT_TARGETS[name]))
        with torch.no_grad():  # "trained": lora_B away from its zero init, lora_A redrawn reproducibly
            for pname, p in model.named_parameters():
                if ".lora_A." in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
                elif ".lora_B." in pname:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return models


def write_diffusers(out: Path) -> list[Path]:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.training_utils import _collate_lora_metadata
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    models = _peft_models()
    peft_sd = {name: get_peft_model_state_dict(m) for name, m in models.items()}
    StableDiffusionXLPipeline.save_lora_weights(
        out, unet_lora_layers=peft_sd["unet"], text_encoder_lora_layers=peft_sd["text_encoder"],
        text_encoder_2_lora_layers=peft_sd["text_encoder_2"], weight_name="diffusers_peft.safetensors",
        **_collate_lora_metadata(models))
    old = {name: convert_state_dict_to_diffusers(sd) for name, sd in peft_sd.items()}
    StableDiffusionXLPipeline.save_lora_weights(
        out, unet_lora_layers=old["unet"], text_encoder_lora_layers=old["text_encoder"],
        text_encoder_2_lora_layers=old["text_encoder_2"], weight_name="diffusers_sdxl_train_script.safetensors")
    return [out / "diffusers_peft.safetensors", out / "diffusers_sdxl_train_script.safetensors"]


# ------------------------------------------------------------------ kohya (sd-scripts)

def sd_scripts_module_names() -> list[tuple[str, str, object]]:
    """(lora_name, component, torch Linear) in the order sd-scripts' LoRANetwork creates them.

    Text encoders: every Linear inside a CLIPAttention / CLIPMLP, named ``lora_te{1,2}_`` + the HF
    module path with '.' -> '_'.  sd-scripts pins transformers 4.44, whose CLIPTextModel keeps
    ``text_model.``; transformers 5 flattens it, so the prefix is put back.  UNet: every Linear
    inside a Transformer2DModel of sd-scripts' SGM-layout UNet, ``lora_unet_`` + SGM path; the
    tiny diffusers UNet is walked and each module renamed to its SGM name.
    """
    import torch

    from lora_parity.fixtures.tiny_pipeline import build_tiny_components
    from lora_parity.convert.keymap import UNET_SGM, keymap_for
    from lora_parity.convert.layout import tiny_layout

    comps = build_tiny_components(0)
    out = []
    for prefix, comp in (("lora_te1", "text_encoder"), ("lora_te2", "text_encoder_2")):
        model = comps[comp]
        flat = not hasattr(model, "text_model")
        for name, module in model.named_modules():
            if type(module).__name__ in SD_SCRIPTS_TE_MODULES:
                for child, sub in module.named_modules():
                    if isinstance(sub, torch.nn.Linear):
                        path = ("text_model." if flat else "") + f"{name}.{child}"
                        out.append((f"{prefix}.{path}".replace(".", "_"), comp, sub))
    by_dif = keymap_for(tiny_layout()).by_diffusers
    for name, module in comps["unet"].named_modules():
        if type(module).__name__ in SD_SCRIPTS_UNET_MODULES:
            for child, sub in module.named_modules():
                if isinstance(sub, torch.nn.Linear):
                    entry, _ = by_dif[f"unet.{name}.{child}"]
                    sgm = entry.sgm[len(UNET_SGM):]
                    out.append((f"lora_unet.{sgm}".replace(".", "_"), "unet", sub))
    return out


def _sshs_hashes(tensors, metadata) -> tuple[str, str]:
    """sd-webui-additional-networks' hashes, as sd-scripts precomputes them: over a serialisation
    holding only the ``ss_`` metadata; new = sha256 of the data after the header, legacy = first 8
    hex digits of sha256 of 64 KiB at offset 1 MiB."""
    import safetensors.torch

    blob = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    new = hashlib.sha256(blob[8 + header:]).hexdigest()
    legacy = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return new, legacy


def write_kohya(out: Path) -> list[Path]:
    import math

    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(4321)
    state = {}
    for lora_name, _, linear in sd_scripts_module_names():
        down = torch.empty(RANK, linear.in_features)
        torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=gen)  # LoRAModule's lora_down init
        up = 0.05 * torch.randn(linear.out_features, RANK, generator=gen)  # trained (init is zeros)
        # LoRAModule registers alpha as torch.tensor(alpha) (0-d) before lora_down / lora_up
        state[f"{lora_name}.alpha"] = torch.tensor(KOHYA_ALPHA)
        state[f"{lora_name}.lora_down.weight"] = down
        state[f"{lora_name}.lora_up.weight"] = up
    save_dtype = torch.float16  # --save_precision fp16: save_weights casts every entry, alpha included
    state = {k: v.detach().clone().to("cpu").to(save_dtype) for k, v in state.items()}
    metadata = {  # train_network.py's str()-ed values (a representative subset)
        "ss_session_id": str(SESSION_SEED),
        "ss_training_started_at": str(FIXED_START),
        "ss_output_name": "kohya_sdxl",
        "ss_learning_rate": "0.0001",
        "ss_text_encoder_lr": "None",
        "ss_unet_lr": "None",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(RANK),
        "ss_network_alpha": str(KOHYA_ALPHA),
        "ss_network_dropout": "None",
        "ss_mixed_precision": "fp16",
        "ss_full_fp16": "False",
        "ss_v2": "False",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_clip_skip": "None",
        "ss_seed": "42",
        "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
        "ss_resolution": "(1024, 1024)",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "kohya_sdxl",
        "modelspec.resolution": "1024x1024",
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": "2023-11-14T22:13:20",
    }
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = _sshs_hashes(state, metadata)
    path = out / "kohya_sdxl.safetensors"
    save_file(state, str(path), metadata)
    return [path]


# ------------------------------------------------------------------ official single-file name lists

#: Tensors the official files hold that are buffers, not parameters, of any model here:
#: CLIP-L's position_ids (int64 [1, 77]); absent from the refiner (no CLIP-L).
EXTRA_BUFFERS = {"sdxl-base": [("conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                                (1, 77), "I64")],
                 "sdxl-refiner": []}
OFFICIAL_FLOAT_DTYPE = "F16"


def name_lines(model: str) -> list[str]:
    from lora_parity.bases.configs import PIPELINES
    from lora_parity.bases.single_file import expected_params, torch_spelling

    rows = [(torch_spelling(n), tuple(shape), OFFICIAL_FLOAT_DTYPE)
            for n, (shape, _) in expected_params(PIPELINES[model]).items()]
    rows += EXTRA_BUFFERS[model]
    return [f"{n}\t{json.dumps(list(s))}\t{d}" for n, s, d in sorted(rows)]


def write_name_lists(out: Path) -> list[Path]:
    written = []
    for fname, model in NAME_LISTS.items():
        path = out / fname
        path.write_text("\n".join(name_lines(model)) + "\n")
        written.append(path)
    return written


# ------------------------------------------------------------------ golden report.json

def write_report(out: Path) -> list[Path]:
    with tempfile.TemporaryDirectory(prefix="lp_fixture_") as tmp:
        run = [sys.executable, "-m", "lora_parity"]
        subprocess.run(run + ["fixture", "fx"], cwd=tmp, check=True)
        res = subprocess.run(run + ["compare", "--pt-base", "fx/pt_base", "--ms-base", "fx/ms_base.ckpt",
                                    "--ms-lora", "fx/ms_lora.ckpt", "--steps", "2", "--report", "report"],
                             cwd=tmp)
        report = Path(tmp) / "report" / "report.json"
        if res.returncode != 0 or not json.loads(report.read_text())["passed"]:
            raise SystemExit(f"compare did not pass (exit {res.returncode}): no golden report written")
        shutil.copyfile(report, out / "report.json")
    return [out / "report.json"]


WRITERS = {"mindone": write_mindone, "diffusers": write_diffusers, "kohya": write_kohya,
           "names": write_name_lists, "report": write_report}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "fixtures")
    ap.add_argument("--only", nargs="+", choices=sorted(WRITERS), help="write only these groups")
    ap.add_argument("--no-report", action="store_true", help="skip report.json (the slow, volatile one)")
    args = ap.parse_args(argv)
    _ensure_hash_seed()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    groups = args.only or [g for g in WRITERS if not (args.no_report and g == "report")]
    for group in groups:
        for path in WRITERS[group](args.out):
            path.chmod(0o644)  # MindSpore: 0400, safetensors: 0600; committed files are plain 0644
            print(f"{path.stat().st_size:>9,}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
