"""MindONE's real checkpoint variants are read correctly (see ``lora_parity.convert.formats`` for the sources).

* ``*_lora.ckpt`` and ``*_lora_ema.ckpt`` (EMA weights under the same names) both just work;
* in-memory names MindONE strips before saving (``ema.``, ``._backbone``, ``stage1.``, wrapper
  prefixes) are normalised;
* training checkpoints: only the LoRA is taken, base weights / optimizer state / counters are
  listed by kind, optimizer copies of LoRA tensors are never taken as LoRA;
* a file with both plain and ``ema.`` LoRA tensors needs ``--ema`` or ``--no-ema``;
* trained biases (``bias="lora_only"``) round-trip bitwise through ``ms`` and are refused, naming
  file and key, by PEFT and kohya.

Files are written with the project's writer and, for the training/EMA variant, with
``mindspore.save_checkpoint`` itself.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_parity.convert import ckpt_io, formats
from lora_parity.convert.converter import ConvertOptions, convert, load_lora
from lora_parity.errors import LoraParityError
from lora_parity.convert.safetensors_io import write_safetensors
from lora_parity.fixtures.synthetic import make_lora
from lora_parity.convert.tensor import Tensor
from lora_parity.convert.layout import tiny_layout

from .helpers import run_cli, snapshot

pytestmark = pytest.mark.conversion

OUT = "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_out.0"  # has a bias
Q = "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q"  # has none


@pytest.fixture(scope="module")
def layout():
    return tiny_layout()


@pytest.fixture(scope="module")
def trained(layout):
    return make_lora(layout, rank=4, seed=11)


@pytest.fixture(scope="module")
def averaged(layout):
    """The EMA copy: same modules and names, other values."""
    return make_lora(layout, rank=4, seed=12)


def ms_names(lora) -> dict[str, Tensor]:
    return formats.tensors_for(lora, "ms")[0]


def read(path: Path) -> dict[str, Tensor]:
    return formats.read_tensors(path)[0]


def assert_bitwise(expected: dict[str, Tensor], got: dict[str, Tensor]) -> None:
    assert sorted(expected) == sorted(got)
    bad = [k for k in expected if not expected[k].bitwise_equal(got[k])]
    assert not bad, bad[:3]


def to_peft(src: Path, dst: Path, **kw):
    return convert(ConvertOptions(src=src, dst=dst, fmt="peft", layout="tiny", **kw))


def zeros_like(t: Tensor) -> Tensor:
    return Tensor.from_numpy(np.zeros(t.shape, np.float32))


def cli_error(argv: list[str]) -> str:
    """The CLI fails with exactly one line on stderr and no traceback; returns it."""
    code, _, err = run_cli(argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- *_lora.ckpt and *_lora_ema.ckpt

def test_lora_and_lora_ema_files_both_convert(tmp_path, trained, averaged):
    """MindONE's gm save_checkpoint writes both files under the same names; each converts as is."""
    for name, lora in (("sdxl_1000_lora.ckpt", trained), ("sdxl_1000_lora_ema.ckpt", averaged)):
        src = tmp_path / name
        ckpt_io.write_ckpt(src, ms_names(lora))
        report = to_peft(src, tmp_path / f"{name}.safetensors")
        assert_bitwise(formats.tensors_for(lora, "peft")[0], read(report.dst))
        assert report.skipped == [] and report.notes == [] and report.biases == 0


# ---------------------------------------------------------------- in-memory names

def _rename(tensors: dict[str, Tensor], how) -> dict[str, Tensor]:
    return {how(k): t for k, t in tensors.items()}


NAME_VARIANTS = {
    # MindSpore 2.1/2.2 auto-prefix bug: gm strips the first "._backbone" on save, all on load
    "backbone_mid": lambda k: k.replace(".attn1.", ".attn1._backbone.").replace(".attn2.", ".attn2._backbone."),
    "backbone_twice": lambda k: k.replace("model.diffusion_model.", "model._backbone.diffusion_model._backbone.", 1),
    # gm's DiffusionEngineMultiGraph keeps the UNet as stage1/stage2 and saves it as model.
    "stage1": lambda k: k.replace("model.diffusion_model.", "stage1.diffusion_model.", 1),
    # a wrapper attribute MindSpore's auto-prefix put in front (gm TrainOneStepCell.ldm_with_loss_grad)
    "wrapper": lambda k: "ldm_with_loss_grad." + k,
}


@pytest.mark.parametrize("variant", sorted(NAME_VARIANTS))
def test_in_memory_names_are_normalised(tmp_path, trained, variant):
    src = tmp_path / f"{variant}.ckpt"
    ckpt_io.write_ckpt(src, _rename(ms_names(trained), NAME_VARIANTS[variant]))
    report = to_peft(src, tmp_path / "pt.safetensors")
    assert_bitwise(formats.tensors_for(trained, "peft")[0], read(report.dst))
    assert report.skipped == [] and report.modules == len(trained.pairs)


def test_ema_only_names_are_taken_as_the_ema_weights(tmp_path, averaged):
    """In-memory EMA names ('ema.' + name, ParameterTuple.clone(prefix="ema")) kept by an old save."""
    src = tmp_path / "ema_names.ckpt"
    ckpt_io.write_ckpt(src, _rename(ms_names(averaged), lambda k: "ema." + k))
    report = to_peft(src, tmp_path / "pt.safetensors")
    assert_bitwise(formats.tensors_for(averaged, "peft")[0], read(report.dst))
    assert any("'ema.'" in n for n in report.notes) and "took EMA weights" in report.summary()
    # and back to a clean MindONE file, bitwise
    back = convert(ConvertOptions(src=src, dst=tmp_path / "clean.ckpt", fmt="ms", layout="tiny"))
    assert_bitwise(ms_names(averaged), read(back.dst))


def test_names_that_collide_after_normalising_are_refused(tmp_path, trained):
    t = ms_names(trained)
    t[f"{Q}._backbone.lora_A.weight"] = t[f"{Q}.lora_A.weight"]
    ckpt_io.write_ckpt(tmp_path / "dup.ckpt", t)
    line = cli_error(["convert", str(tmp_path / "dup.ckpt"), "--layout", "tiny"])
    assert "dup.ckpt" in line and f"{Q}._backbone.lora_A.weight" in line and f"{Q}.lora_A.weight" in line


# ---------------------------------------------------------------- training checkpoints

def training_checkpoint(lora, layout) -> tuple[dict[str, Tensor], dict[str, int]]:
    """LoRA + everything a MindSpore/MindONE training checkpoint keeps next to it, and the expected counts."""
    lt = ms_names(lora)
    out: dict[str, Tensor] = {}
    base = {
        "model.diffusion_model.input_blocks.0.0.weight": Tensor.from_numpy(np.ones((32, 4, 3, 3), np.float32)),
        f"{OUT}.weight": Tensor.from_numpy(np.ones((64, 64), np.float32)),
        f"{OUT}.bias": Tensor.from_numpy(np.ones(64, np.float32)),  # base bias: a base weight here
        "model.diffusion_model.out.0.gamma": Tensor.from_numpy(np.ones(32, np.float32)),
        "model.diffusion_model.out.0.beta": Tensor.from_numpy(np.zeros(32, np.float32)),
        "first_stage_model.decoder.conv_out.weight": Tensor.from_numpy(np.ones((3, 16, 3, 3), np.float32)),
    }
    for k, t in list(base.items())[:2] + list(lt.items()):  # interleave like a real state dict
        out[k] = t
    out.update(base)
    optimizer = {}
    for k, t in {**lt, **base}.items():  # AdamWeightDecay keeps copies of every trained tensor
        optimizer[f"adam_m.{k}"] = zeros_like(t)
        optimizer[f"adam_v.{k}"] = zeros_like(t)
    k0 = next(iter(lt))
    optimizer[f"ldm_with_loss_grad.optimizer.adam_m.{k0}"] = zeros_like(lt[k0])  # gm wrapper-prefixed
    optimizer[f"accum_grad.{k0}"] = zeros_like(lt[k0])  # gm gradient accumulation
    optimizer[f"grad_accumulated_.{k0}"] = zeros_like(lt[k0])  # mindone TrainOneStepWrapper
    optimizer[f"moment1.{k0}"] = zeros_like(lt[k0])  # nn.Adam
    swap = {f"swap.{k}": zeros_like(t) for k, t in lt.items()}  # mindone EMA swap_cache
    state = {
        "global_step": Tensor.from_numpy(np.array([1200], np.int32)),
        "learning_rate": Tensor.from_numpy(np.full(10, 1e-4, np.float32)),  # a dynamic-lr vector
        "beta1_power": Tensor.from_numpy(np.array([0.9], np.float32)),
        "scale_sense": Tensor.from_numpy(np.array([1024.0], np.float32)),
        "epoch_num": Tensor.from_numpy(np.array(3, np.int64).reshape(())),
        "step_num": Tensor.from_numpy(np.array(1200, np.int64).reshape(())),
        "loss_scale": Tensor.from_numpy(np.array(1024.0, np.float32).reshape(())),
        "lora_rank": Tensor.from_numpy(np.array(4, np.int64).reshape(())),  # EvalSaveCallback append_dict
        "updates": Tensor.from_numpy(np.array(1200.0, np.float32).reshape(())),  # EMA update counter
    }
    out.update(optimizer)
    out.update(swap)
    out.update(state)
    counts = {formats.IGNORED_BASE: len(base), formats.IGNORED_OPTIMIZER: len(optimizer),
              formats.IGNORED_SWAP: len(swap), formats.IGNORED_STATE: len(state)}
    return out, counts


def test_training_checkpoint_takes_lora_only(tmp_path, layout, trained):
    tensors, counts = training_checkpoint(trained, layout)
    src = tmp_path / "train_resume.ckpt"
    ckpt_io.write_ckpt(src, tensors)
    before = snapshot(tmp_path)
    report = to_peft(src, tmp_path / "pt.safetensors")
    assert_bitwise(formats.tensors_for(trained, "peft")[0], read(report.dst))
    assert report.ignored_counts() == counts
    assert sorted(report.skipped) == sorted(k for k in tensors if k not in ms_names(trained))
    assert report.biases == 0  # the base bias next to base weights is not a trained LoRA bias
    total = sum(counts.values())
    line = next(ln for ln in report.summary().splitlines() if "skipped" in ln)
    assert f"skipped {total} non-LoRA entries (" in line
    for kind, n in counts.items():
        assert f"{n} {kind}" in line
    # the input is untouched; MindONE names out again are bitwise the LoRA
    ms = convert(ConvertOptions(src=src, dst=tmp_path / "lora.ckpt", fmt="ms", layout="tiny"))
    assert_bitwise(ms_names(trained), read(ms.dst))
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before


def test_optimizer_copies_alone_are_not_a_lora(tmp_path, trained):
    t = {f"adam_m.{k}": v for k, v in ms_names(trained).items()}
    t.update({f"swap.{k}": v for k, v in ms_names(trained).items()})
    ckpt_io.write_ckpt(tmp_path / "opt.ckpt", t)
    line = cli_error(["convert", str(tmp_path / "opt.ckpt"), "--layout", "tiny"])
    assert "opt.ckpt" in line and "no LoRA tensors" in line


# ---------------------------------------------------------------- plain + ema. in one file

def both_sets(trained, averaged) -> dict[str, Tensor]:
    t = dict(ms_names(trained))
    t.update({f"ema.{k}": v for k, v in ms_names(averaged).items()})
    return t


def test_both_sets_need_a_choice(tmp_path, trained, averaged):
    src = tmp_path / "both.ckpt"
    ckpt_io.write_ckpt(src, both_sets(trained, averaged))
    before = snapshot(tmp_path)
    line = cli_error(["convert", str(src), "--layout", "tiny"])
    first_ema = "ema." + next(iter(ms_names(averaged)))
    n = 2 * len(trained.pairs)
    assert line == (f"lora-parity: error: {src}: key '{first_ema}': holds both trained LoRA tensors ({n}) and "
                    f"their EMA copies ('ema.' names, {n}); pass --ema to convert the EMA weights or --no-ema "
                    f"for the trained ones")
    assert snapshot(tmp_path) == before

    with pytest.raises(LoraParityError, match="--ema"):
        load_lora(src, layout=trained.layout)
    ema = to_peft(src, tmp_path / "ema.safetensors", ema=True)
    assert_bitwise(formats.tensors_for(averaged, "peft")[0], read(ema.dst))
    assert ema.ignored_counts() == {formats.IGNORED_PLAIN_LORA: n}
    plain = to_peft(src, tmp_path / "plain.safetensors", ema=False)
    assert_bitwise(formats.tensors_for(trained, "peft")[0], read(plain.dst))
    assert plain.ignored_counts() == {formats.IGNORED_EMA_LORA: n}
    # the library API takes the same choice
    assert load_lora(src, layout=trained.layout, ema=True).pairs[OUT].A.bitwise_equal(averaged.pairs[OUT].A)
    assert load_lora(src, layout=trained.layout, ema=False).pairs[OUT].A.bitwise_equal(trained.pairs[OUT].A)

    code, out, err = run_cli(["convert", str(src), "--layout", "tiny", "--ema", "-o", str(tmp_path / "c.safetensors")])
    assert code == 0 and err == "" and "took EMA weights" in out and f"skipped {n}" in out
    code, _, err = run_cli(["convert", str(src), "--ema", "--no-ema"])
    assert code == 2 and "not allowed with" in err


def test_ema_flags_that_cannot_apply(tmp_path, trained, averaged):
    plain = tmp_path / "sdxl_lora.ckpt"
    ckpt_io.write_ckpt(plain, ms_names(trained))
    line = cli_error(["convert", str(plain), "--layout", "tiny", "--ema"])
    assert "sdxl_lora.ckpt" in line and "no 'ema.' LoRA tensors" in line and "_lora_ema.ckpt" in line
    ema_only = tmp_path / "ema_only.ckpt"
    ckpt_io.write_ckpt(ema_only, {f"ema.{k}": v for k, v in ms_names(averaged).items()})
    line = cli_error(["convert", str(ema_only), "--layout", "tiny", "--no-ema"])
    assert "ema_only.ckpt" in line and "only EMA LoRA tensors" in line
    # --no-ema on a plain file is what happens anyway
    assert to_peft(plain, tmp_path / "p.safetensors", ema=False).modules == len(trained.pairs)
    peft = tmp_path / "peft.safetensors"
    line = cli_error(["convert", str(tmp_path / "p.safetensors"), "--layout", "tiny", "--ema", "-o", str(peft)])
    assert "p.safetensors" in line and "--ema" in line


# ---------------------------------------------------------------- real mindspore.save_checkpoint

def test_mindspore_saved_training_checkpoint_with_ema(tmp_path, layout, trained, averaged):
    """The same variants written by MindSpore itself: ema. copies, adam_m/adam_v, global_step, append_dict."""
    ms = pytest.importorskip("mindspore")
    lt, et = ms_names(trained), ms_names(averaged)
    params = []
    for k, t in lt.items():
        params.append({"name": k, "data": ms.Tensor(t.data)})
        params.append({"name": f"ema.{k}", "data": ms.Tensor(et[k].data)})
    base_w = np.ones((64, 64), np.float16)
    params.append({"name": f"{OUT}.weight", "data": ms.Tensor(base_w)})
    for k, t in lt.items():
        params.append({"name": f"adam_m.{k}", "data": ms.Tensor(np.zeros(t.shape, np.float32))})
        params.append({"name": f"adam_v.{k}", "data": ms.Tensor(np.zeros(t.shape, np.float32))})
    params.append({"name": "global_step", "data": ms.Tensor(np.array([1200], np.int32))})
    params.append({"name": "learning_rate", "data": ms.Tensor(np.array(1e-4, np.float32))})
    src = tmp_path / "SDXL-base-1.0_1200.ckpt"
    ms.save_checkpoint(params, str(src), append_dict={"epoch_num": 3, "step_num": 1200, "lora_rank": 4,
                                                      "model_name": "SDXL-base-1.0"})  # a str record

    n = len(lt)
    line = cli_error(["convert", str(src), "--layout", "tiny"])
    assert str(src) in line and "--ema" in line and "--no-ema" in line

    for ema, lora in ((True, averaged), (False, trained)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the str record is reported in the summary, not warned about
            report = to_peft(src, tmp_path / f"{ema}.safetensors", ema=ema)
        assert_bitwise(formats.tensors_for(lora, "peft")[0], read(report.dst))
        assert report.ignored_counts() == {
            formats.IGNORED_PLAIN_LORA if ema else formats.IGNORED_EMA_LORA: n,
            formats.IGNORED_BASE: 1, formats.IGNORED_OPTIMIZER: 2 * n, formats.IGNORED_STATE: 5,
            formats.IGNORED_STRINGS: 1}
        assert "model_name" in report.ignored[formats.IGNORED_STRINGS]
        back = convert(ConvertOptions(src=report.dst, dst=tmp_path / f"{ema}.ckpt", layout="tiny"))
        loaded = ms.load_checkpoint(str(back.dst))  # a clean MindONE LoRA, readable by MindSpore
        assert sorted(loaded) == sorted(lt)
        for k, t in ms_names(lora).items():
            assert np.array_equal(loaded[k].asnumpy(), t.data)


# ---------------------------------------------------------------- trained biases

def lora_with_bias(trained, bias: np.ndarray | None = None, module: str = OUT) -> dict[str, Tensor]:
    t = dict(ms_names(trained))
    b = np.linspace(-1, 1, 64, dtype=np.float32) if bias is None else bias
    t[f"{module}.bias"] = Tensor.from_numpy(b)
    return t


def test_trained_bias_round_trips_through_ms_and_is_refused_by_pytorch_formats(tmp_path, trained):
    src = tmp_path / "bias_lora.ckpt"
    tensors = lora_with_bias(trained)
    ckpt_io.write_ckpt(src, tensors)
    lora = load_lora(src, layout=trained.layout)
    assert lora.pairs[OUT].bias.bitwise_equal(tensors[f"{OUT}.bias"])
    assert lora.bias_keys == {OUT: f"{OUT}.bias"}

    report = convert(ConvertOptions(src=src, dst=tmp_path / "again.ckpt", fmt="ms", layout="tiny"))
    assert_bitwise(tensors, read(report.dst))
    assert report.biases == 1 and report.skipped == [] and "trained bias" in report.summary()
    again = convert(ConvertOptions(src=report.dst, dst=tmp_path / "again2.ckpt", fmt="ms", layout="tiny",
                                   dtype="fp16"))
    assert read(again.dst)[f"{OUT}.bias"].dtype == "F16"

    before = snapshot(tmp_path)
    for fmt in ("peft", "kohya"):
        line = cli_error(["convert", str(src), "--layout", "tiny", "--format", fmt])
        assert line.startswith(f"lora-parity: error: {src}: key '{OUT}.bias': trained bias")
        assert f"cannot be written as {fmt}" in line and "--format ms" in line
    assert snapshot(tmp_path) == before, "nothing written"


def test_ema_bias_follows_its_set(tmp_path, trained, averaged):
    t = lora_with_bias(trained)
    t.update({f"ema.{k}": v for k, v in lora_with_bias(averaged, np.full(64, 0.5, np.float32)).items()})
    ckpt_io.write_ckpt(tmp_path / "both_bias.ckpt", t)
    ema = load_lora(tmp_path / "both_bias.ckpt", layout=trained.layout, ema=True)
    assert np.array_equal(ema.pairs[OUT].bias.data, np.full(64, 0.5, np.float32))
    assert ema.bias_keys == {OUT: f"ema.{OUT}.bias"}
    assert f"{OUT}.bias" in ema.ignored[formats.IGNORED_PLAIN_LORA]


@pytest.mark.parametrize("case", ["no_bias_in_layout", "wrong_shape", "no_lora", "nan"])
def test_bad_trained_bias(tmp_path, trained, case):
    if case == "no_bias_in_layout":  # MindONE's to_q Dense is built with has_bias=False
        t, key, words = lora_with_bias(trained, module=Q), f"{Q}.bias", "has no bias"
    elif case == "wrong_shape":
        t, key, words = lora_with_bias(trained, np.ones(63, np.float32)), f"{OUT}.bias", "expected [64]"
    elif case == "no_lora":
        other = "model.diffusion_model.input_blocks.3.1.proj_in"
        t, key, words = lora_with_bias(trained, module=other), f"{other}.bias", "no LoRA"
    else:
        bad = np.ones(64, np.float32)
        bad[3] = np.nan
        t, key, words = lora_with_bias(trained, bad), f"{OUT}.bias", "NaN"
    ckpt_io.write_ckpt(tmp_path / "b.ckpt", t)
    line = cli_error(["convert", str(tmp_path / "b.ckpt"), "--layout", "tiny", "--format", "ms",
                      "-o", str(tmp_path / "o.ckpt")])
    assert "b.ckpt" in line and f"key '{key}'" in line and words in line


@pytest.mark.parametrize("fmt,suffix", [("peft", ".lora_B.bias"), ("peft", ".base_layer.bias"),
                                        ("kohya", ".diff_b")])
def test_pytorch_lora_biases_are_refused_not_dropped(tmp_path, trained, fmt, suffix):
    t, meta = formats.tensors_for(trained, fmt)
    first = next(k for k in t if k.endswith((".lora_B.weight", ".lora_up.weight")))
    stem = first.rsplit(".", 2)[0]
    key = stem + suffix
    t[key] = Tensor.from_numpy(np.ones(t[first].shape[0], np.float32))
    write_safetensors(tmp_path / "pt.safetensors", t, meta)
    line = cli_error(["convert", str(tmp_path / "pt.safetensors"), "--layout", "tiny"])
    assert "pt.safetensors" in line and f"key '{key}'" in line and "cannot convert" in line


# ---------------------------------------------------------------- the name classifier

SGM_LORA = st.sampled_from([f"{OUT}.lora_A.weight", f"{Q}.lora_B.weight",
                            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj"
                            ".lora_A.weight"])


@settings(max_examples=60, deadline=None)
@given(name=SGM_LORA, ema=st.booleans(), backbone=st.booleans(), wrapper=st.booleans(),
       optimizer=st.sampled_from([None, *sorted(formats.OPTIMIZER_SEGMENTS), "swap"]))
def test_classifier_never_takes_optimizer_state_as_lora(name, ema, backbone, wrapper, optimizer):
    key = name.replace(".lora_", "._backbone.lora_") if backbone else name
    key = ("ema." if ema else "") + key
    if optimizer:
        key = f"{optimizer}.{key}"
    if wrapper:
        key = "ldm_with_loss_grad." + key
    c = formats.classify_ms_key(key, 8)
    if optimizer is None:
        assert (c.kind, c.name, c.ema) == ("lora", name, ema)
    else:
        assert c.kind == ("swap" if optimizer == "swap" else "optimizer")

