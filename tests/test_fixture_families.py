"""``lora-parity fixture DIR --family F`` (issue 15): a tiny pipeline + LoRA of each family.

The LoRA must be what the family's users have: for SD3 / Flux, a PEFT file that diffusers' own
``load_lora_weights`` takes completely from the written folder (every file tensor lands, values equal), on
exactly the modules mindone.diffusers' trainers target -- stated here from the trainers, independently of the
fixture code, and matched against the real diffusers module tree.  Then the command's contract: a bad family
or an existing output is one line and exit 2 with nothing touched, ``--force`` replaces, a failure mid-build
leaves nothing behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from lora_parity.convert.converter import load_lora
from lora_parity.convert.layout import load_layout
from lora_parity.convert.safetensors_io import read_safetensors
from lora_parity.fixtures import families
from lora_parity.fixtures.families import MS_LORA_FILE, PEFT_FILE, RANK, write_family_fixture

from .helpers import run_cli, snapshot

pytestmark = pytest.mark.conversion

# mindone.diffusers' trainers (examples/diffusers/dreambooth/train_dreambooth_lora_{sd3,flux}.py): LoraConfig
# target_modules, matched by PEFT as the module name or a dotted suffix; CLIP text encoders as the scripts that
# train them target them
CLIP = ["q_proj", "k_proj", "v_proj", "out_proj"]
ATTN = ["to_k", "to_q", "to_v", "to_out.0"]  # SD 1.x / 2.x: train_text_to_image_lora.py, train_dreambooth_lora.py
TARGETS = {
    "sd1": {"unet": ATTN, "text_encoder": CLIP},
    "sd2": {"unet": ATTN, "text_encoder": CLIP},
    "sd3": {"transformer": ["to_k", "to_q", "to_v", "to_out.0"], "text_encoder": CLIP, "text_encoder_2": CLIP},
    "flux": {"transformer": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                             "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                             "ff_context.net.0.proj", "ff_context.net.2"],
             "text_encoder": CLIP},
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: write_family_fixture(root / f, f, seed=3).root for f in ("sd3", "flux", "sd1", "sd2")}


def _pipeline(folder: Path):
    import torch
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(folder), variant="fp16", torch_dtype=torch.float32,
                                             local_files_only=True)


def _expected_keys(pipe, family: str) -> set[str]:
    """Every Linear of the real module tree the trainer's target_modules select, as PEFT file keys."""
    import torch

    keys = set()
    for comp, targets in TARGETS[family].items():
        for name, module in getattr(pipe, comp).named_modules():
            if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
                name = name.removeprefix("text_model.")  # transformers 5 flattens CLIPTextModel
                keys |= {f"{comp}.{name}.lora_A.weight", f"{comp}.{name}.lora_B.weight"}
    return keys


PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline",
             "flux": "FluxPipeline"}


@pytest.mark.parametrize("family", ["sd3", "flux", "sd1", "sd2"])
def test_diffusers_loads_the_whole_lora_from_the_written_folder(written, family):
    from lora_parity.backends.diffusers.view import load_lora_checked

    root = written[family]
    assert sorted(p.name for p in root.iterdir()) == sorted(families.outputs_of(family))
    pipe = _pipeline(root / "pt_base")
    assert type(pipe).__name__ == PIPELINES[family]
    tensors, meta = read_safetensors(root / PEFT_FILE)
    got = {k.replace(".text_model.", ".") for k in tensors}
    assert got == _expected_keys(pipe, family)  # the trainer's modules, no more, no fewer
    report = load_lora_checked(pipe, root / PEFT_FILE)  # raises naming any tensor that did not land
    assert len(report.loaded) == len(tensors)
    adapter = json.loads(meta["lora_adapter_metadata"])
    for comp in TARGETS[family]:
        assert adapter[f"{comp}.r"] == RANK and adapter[f"{comp}.lora_alpha"] == RANK  # lora_alpha = rank
    b = [t.to_float("float32") for k, t in tensors.items() if k.endswith("lora_B.weight")]
    assert all(np.abs(x).max() > 0 for x in b)  # trained-looking: a zero lora_B would make parity trivial


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_sd_ldm_ckpt_holds_the_same_lora_as_the_peft_file(written, family):
    """MindONE's LDM ``.ckpt`` (what the port runs) and the PEFT file: one LoRA, bitwise."""
    root = written[family]
    layout = load_layout(f"tiny-{family}")
    ms, pt = load_lora(root / MS_LORA_FILE, layout=layout), load_lora(root / PEFT_FILE, layout=layout)
    assert set(ms.pairs) == set(pt.pairs) and ms.pairs
    for name, p in ms.pairs.items():
        q = pt.pairs[name]
        assert p.A.bitwise_equal(q.A) and p.B.bitwise_equal(q.B) and p.scale == q.scale == 1.0, name


def test_default_family_is_the_built_in_sdxl_fixture():
    from lora_parity.cli import build_parser

    assert build_parser().parse_args(["fixture", "d"]).family == "sdxl"
    assert families.outputs_of("sdxl") == ("pt_base", "ms_base.ckpt", "ms_lora.ckpt", "latents.npy", "prompt.txt")


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for argv, says in ((["--family", "sd4"], "unknown family 'sd4'"), (["--seed", "-1", "--family", "sd3"],
                                                                        "non-negative")):
        code, out, err = run_cli(["fixture", str(tmp_path / "x"), *argv])
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(["fixture", str(tmp_path / "file"), "--family", "flux"])
    assert code == 2 and "not a folder" in err and len(err.strip().splitlines()) == 1


def test_existing_outputs_are_kept_without_force_and_replaced_with_it(written, tmp_path):
    root = tmp_path / "fx"
    root.mkdir()
    (root / "notes.txt").write_text("mine")  # not an output: never touched
    code, _, err = run_cli(["fixture", str(root), "--family", "flux", "--seed", "3"])
    assert code == 0, err
    assert (root / PEFT_FILE).read_bytes() == (written["flux"] / PEFT_FILE).read_bytes()  # deterministic by seed
    (root / "pt_base" / "stale").write_text("old")
    before = snapshot(root)
    code, _, err = run_cli(["fixture", str(root), "--family", "flux"])
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(root) == before
    code, out, err = run_cli(["fixture", str(root), "--family", "flux", "--seed", "4", "--force"])
    assert code == 0 and "wrote pt_base" in out, err
    assert not (root / "pt_base" / "stale").exists() and (root / "notes.txt").read_text() == "mine"
    assert (root / PEFT_FILE).read_bytes() != before[PEFT_FILE]
    assert sorted(os.listdir(tmp_path)) == ["fx"]  # no staging folder left beside it


def test_a_failure_mid_build_leaves_nothing(tmp_path, monkeypatch):
    from lora_parity.convert import formats

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(formats, "write", boom)
    with pytest.raises(OSError, match="disk full"):
        write_family_fixture(tmp_path / "fx", "sd3")
    assert os.listdir(tmp_path) == []
