"""LoRAs from MindONE's MindSpore port of kohya's sd-scripts (``examples/kohya_sd_scripts``).

``sdxl_train_network.py --save_model_as=ckpt`` calls ``LoRANetwork.save_weights``, which saves
``prefix + "." + name`` for every ``.lora_`` / ``.alpha`` parameter of ``unet.parameters_and_names()`` (and of
each text encoder): the module's *dotted* path in sd-scripts' SGM-layout SDXL UNet or in the HF CLIP text
models (``lora_unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight``,
``lora_te2.text_model.encoder.layers.0.self_attn.q_proj.alpha``), with sd-scripts' ``ss_*`` / ``modelspec.*``
metadata as ``append_dict`` strings.  Its README says torch inference needs extra conversion; its own
``tools/convert_weights.py`` writes no metadata.  Here the file is built from those facts (not by our writer),
and must become the kohya safetensors ComfyUI / A1111 load (names, tensors and metadata), PEFT that diffusers
loads completely with equal deltas, and back, bitwise.
"""
from __future__ import annotations

import numpy as np
import pytest

from lora_parity.convert import ckpt_io
from lora_parity.convert.converter import ConvertOptions, convert, load_lora
from lora_parity.convert.keymap import keymap_for
from lora_parity.convert.safetensors_io import read_safetensors
from lora_parity.convert.tensor import Tensor

from .test_diffusers_load import compare_deltas, load_into_pipeline, pipeline_deltas

pytestmark = pytest.mark.conversion
RANK, ALPHA = 4, 2.0
# what sd-scripts writes (str(v) of each training argument) plus a hash of the original file's bytes
METADATA = {"ss_output_name": "pokemon", "ss_learning_rate": "0.0001", "ss_network_module": "networks.lora",
            "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA), "ss_base_model_version": "sdxl_base_v1-0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "sshs_model_hash": "0" * 64}
TE_PREFIX = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def port_name(entry, part: int) -> str:
    """The name MindONE's sd-scripts port saves: parameters_and_names() of its own SDXL UNet / HF CLIP."""
    if entry.component == "unet":
        return "lora_unet." + entry.sgm.removeprefix("model.diffusion_model.")
    return TE_PREFIX[entry.component] + "." + entry.diffusers[part].split(".", 1)[1]


@pytest.fixture(scope="module")
def port_ckpt(tmp_path_factory, tiny_layout):
    """(file, expected deltas by diffusers name): attention, ff and projections of the UNet, every CLIP
    attention / MLP projection of both text encoders, bigG's q/k/v as three separately trained LoRAs."""
    rng = np.random.default_rng(11)
    km = keymap_for(tiny_layout)
    tensors, deltas = {}, {}
    for e in km.lora_entries():
        if e.component == "unet" and ".transformer_blocks." not in e.sgm and not e.sgm.endswith(("proj_in", "proj_out")):
            continue  # sd-scripts' default LoRA: Transformer2DModel's Linear layers only
        rows = e.out_features // len(e.diffusers)
        for i, dif in enumerate(e.diffusers):
            a = (rng.standard_normal((RANK, e.in_features)) / np.sqrt(e.in_features)).astype(np.float32)
            b = (rng.standard_normal((rows, RANK)) * 0.05).astype(np.float32)
            name = port_name(e, i)
            tensors[f"{name}.lora_down.weight"] = Tensor.from_numpy(a)
            tensors[f"{name}.lora_up.weight"] = Tensor.from_numpy(b)
            tensors[f"{name}.alpha"] = Tensor("F32", np.array(ALPHA, dtype=np.float32).reshape(()))
            deltas[dif] = (ALPHA / RANK) * (b.astype(np.float64) @ a.astype(np.float64))
    path = tmp_path_factory.mktemp("port") / "pokemon_step100.ckpt"
    ckpt_io.write_ckpt(path, tensors, strings=METADATA)
    return path, deltas


def test_port_ckpt_becomes_the_kohya_file_comfyui_loads(tmp_path, port_ckpt):
    src, _ = port_ckpt
    out = tmp_path / "pokemon.safetensors"
    report = convert(ConvertOptions(src=src, dst=out, fmt="kohya", layout="tiny"))
    assert report.src_format == "kohya" and report.unmapped == []
    got, meta = read_safetensors(out)
    original = ckpt_io.read_ckpt(src, skipped=[])
    renamed = {}
    for k, t in original.items():  # the dots of the module path become "_", the tail stays
        prefix, rest = k.split(".", 1)
        mod, tail = (rest.rsplit(".", 2)[0], ".".join(rest.rsplit(".", 2)[1:])) if rest.endswith(".weight") \
            else (rest.rsplit(".", 1)[0], "alpha")
        renamed[f"{prefix}_{mod.replace('.', '_')}.{tail}"] = t
    assert set(got) == set(renamed) and all(got[k].bitwise_equal(renamed[k]) for k in got)
    for k, v in METADATA.items():
        if k.startswith("sshs_"):
            assert k not in meta  # a hash of the original file's bytes is not this file's
        else:
            assert meta[k] == v
    assert all(t.shape == () for k, t in got.items() if k.endswith(".alpha"))  # 0-d, as sd-scripts saves it


def test_port_ckpt_as_peft_loads_completely_in_diffusers(tmp_path, port_ckpt, tiny_pipeline_dir):
    src, deltas = port_ckpt
    out = tmp_path / "peft.safetensors"
    convert(ConvertOptions(src=src, dst=out, fmt="peft", layout="tiny"))
    assert compare_deltas(deltas, pipeline_deltas(load_into_pipeline(tiny_pipeline_dir, out))) == []


def test_kohya_safetensors_to_port_ckpt_and_back_is_bitwise(tmp_path, port_ckpt):
    """kohya safetensors -> the port's .ckpt (``--format kohya`` with a .ckpt output): the very names, tensors
    and metadata strings the port wrote; and PEFT -> port .ckpt too (bigG's q/k/v fused and split back)."""
    src, _ = port_ckpt
    st = tmp_path / "k.safetensors"
    convert(ConvertOptions(src=src, dst=st, fmt="kohya", layout="tiny"))
    again = tmp_path / "again.ckpt"
    convert(ConvertOptions(src=st, dst=again, fmt="kohya", layout="tiny"))
    one, two = ckpt_io.read_ckpt(src, skipped=[]), ckpt_io.read_ckpt(again, skipped=[])
    assert set(one) == set(two) and all(one[k].bitwise_equal(two[k]) for k in one)
    strings: dict[str, str] = {}
    ckpt_io.read_ckpt(again, skipped=[], strings=strings)
    assert {k: v for k, v in METADATA.items() if not k.startswith("sshs_")}.items() <= strings.items()
    peft = tmp_path / "p.safetensors"
    convert(ConvertOptions(src=src, dst=peft, fmt="peft", layout="tiny"))
    third = tmp_path / "third.ckpt"
    convert(ConvertOptions(src=peft, dst=third, fmt="kohya", layout="tiny"))
    three = ckpt_io.read_ckpt(third, skipped=[])
    assert set(one) == set(three) and all(one[k].bitwise_equal(three[k]) for k in one)


def test_mindspore_reads_the_port_ckpt_we_write(tmp_path, port_ckpt):
    """The .ckpt written for the port loads in MindSpore itself, metadata strings included."""
    ms = pytest.importorskip("mindspore")
    src, _ = port_ckpt
    out = tmp_path / "w.ckpt"
    convert(ConvertOptions(src=src, dst=out, fmt="kohya", layout="tiny", force=True))
    loaded = ms.load_checkpoint(str(out))
    assert loaded["ss_output_name"] == "pokemon"
    original = ckpt_io.read_ckpt(src, skipped=[])
    assert all(np.array_equal(loaded[k].asnumpy(), original[k].data) for k in original)


def test_port_ckpt_layout_and_alphas_are_read(port_ckpt, tiny_layout):
    src, _ = port_ckpt
    lora = load_lora(src, layout=tiny_layout)
    assert set(lora.alphas()) <= {ALPHA, 3 * ALPHA}  # bigG's fused q/k/v: rank 3r, alpha 3a (same scale)
    assert {p.scale for p in lora.pairs.values()} == {ALPHA / RANK}
    assert lora.metadata["ss_output_name"] == "pokemon"
