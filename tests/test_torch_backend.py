"""The generated tiny SDXL pipeline and the PyTorch backend (hooks, LoRA load check)."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from lora_parity.parity.tolerances import LORA_EFFECT_MIN_ABS, SAME_FRAMEWORK

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub; the backend also passes local_files_only

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")
from safetensors.numpy import load_file as load_np  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lora_parity.backends import Activations, ParityInputs, PipelineView, get_view  # noqa: E402
from lora_parity.backends.diffusers.view import (  # noqa: E402
    LoraLoadError,
    TorchBackend,
    capture,
)
from lora_parity.errors import LoraParityError  # noqa: E402
from lora_parity.fixtures import DEFAULT_PROMPT, build_tiny_pipeline, make_latents, write_latents  # noqa: E402
from lora_parity.convert.tiny import TINY_IMAGE_SIZE, TINY_LATENT_SHAPE  # noqa: E402

pytestmark = pytest.mark.parity

LORA_MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear(64 -> 64)
RANK = 4

EXPECTED_UNET = {  # name -> shape, in forward order
    "unet.time_embedding": (1, 128),
    "unet.add_embedding": (1, 128),
    "unet.conv_in": (1, 32, 16, 16),
    "unet.down_blocks.0.resnets.0": (1, 32, 16, 16),
    "unet.down_blocks.0.downsamplers.0": (1, 32, 8, 8),
    "unet.down_blocks.1.resnets.0": (1, 64, 8, 8),
    "unet.down_blocks.1.attentions.0": (1, 64, 8, 8),
    "unet.mid_block.resnets.0": (1, 64, 8, 8),
    "unet.mid_block.attentions.0": (1, 64, 8, 8),
    "unet.mid_block.resnets.1": (1, 64, 8, 8),
    "unet.mid_block": (1, 64, 8, 8),
    "unet.up_blocks.0.resnets.0": (1, 64, 8, 8),
    "unet.up_blocks.0.attentions.0": (1, 64, 8, 8),
    "unet.up_blocks.0.resnets.1": (1, 64, 8, 8),
    "unet.up_blocks.0.attentions.1": (1, 64, 8, 8),
    "unet.up_blocks.0.upsamplers.0": (1, 64, 16, 16),
    "unet.up_blocks.1.resnets.0": (1, 32, 16, 16),
    "unet.up_blocks.1.resnets.1": (1, 32, 16, 16),
    "unet.conv_out": (1, 4, 16, 16),
}
EXPECTED_VAE = {
    "vae.post_quant_conv": (1, 4, 16, 16),
    "vae.decoder.conv_in": (1, 32, 16, 16),
    "vae.decoder.mid_block": (1, 32, 16, 16),
    "vae.decoder.up_blocks.0": (1, 32, 32, 32),
    "vae.decoder.up_blocks.1": (1, 16, 32, 32),
    "vae.decoder.conv_norm_out": (1, 16, 32, 32),
    "vae.decoder.conv_out": (1, 3, 32, 32),
}


def _weights_digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


@pytest.fixture(scope="module")
def backend(tiny_dir):
    return TorchBackend(tiny_dir)


@pytest.fixture(scope="module")
def cond(backend):
    embeds, pooled = backend.encode_prompt(DEFAULT_PROMPT)
    return embeds, pooled, backend.add_time_ids((32, 32), (0, 0), (32, 32))


@pytest.fixture(scope="module")
def base_unet(backend, cond):
    return backend.unet_activations(make_latents(0), 999.0, *cond)


def _peft_lora(path, *, extra: dict | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"unet.{LORA_MODULE}.lora_A.weight": 0.2 * torch.randn(RANK, 64, generator=g),  # (r, in)
        f"unet.{LORA_MODULE}.lora_B.weight": 0.2 * torch.randn(64, RANK, generator=g),  # (out, r), non-zero
    }
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return path


# ---------------------------------------------------------------- the tiny pipeline


def test_tiny_pipeline_folder(tiny_dir):
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_dir / sub).is_dir(), sub
    assert (tiny_dir / "model_index.json").is_file()
    assert list(tiny_dir.rglob("*.bin")) == []  # safetensors only
    import json

    sched = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler"
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    assert (sched["timestep_spacing"], sched["steps_offset"], sched["prediction_type"]) == ("leading", 1, "epsilon")


def test_tiny_weights_are_nontrivial(tiny_dir):
    for f in tiny_dir.rglob("*.safetensors"):
        for key, arr in load_np(str(f)).items():
            if not np.issubdtype(arr.dtype, np.floating):
                continue
            assert np.all(np.isfinite(arr)), (f, key)
            assert np.mean(arr == 0) < 0.01, f"{f.parent.name}/{key} is mostly zero"
            assert arr.size == 1 or arr.std() > 1e-3, f"{f.parent.name}/{key} is constant"


def test_tiny_pipeline_is_deterministic(tmp_path, tiny_dir):
    again = build_tiny_pipeline(tmp_path / "again", seed=0)
    assert _weights_digest(again) == _weights_digest(tiny_dir)
    other = build_tiny_pipeline(tmp_path / "other", seed=1)
    assert _weights_digest(other)["unet/diffusion_pytorch_model.safetensors"] != \
        _weights_digest(tiny_dir)["unet/diffusion_pytorch_model.safetensors"]


def test_tokenizers_offline(backend):
    tok, tok2 = backend.pipe.tokenizer, backend.pipe.tokenizer_2
    assert len(tok) == len(tok2) == 514
    assert tok.model_max_length == tok2.model_max_length == 77
    assert (tok.pad_token, tok2.pad_token) == ("<|endoftext|>", "!")
    ids, ids2 = backend.tokenize("a cat")
    assert ids.shape == ids2.shape == (1, 77)
    # BOS, 'a</w>', 'c', 'a', 't</w>', EOS, then padding
    assert ids[0, :6].tolist() == ids2[0, :6].tolist() == [512, 256 + 64, 66, 64, 256 + 83, 513]
    assert set(ids[0, 6:].tolist()) == {513} and set(ids2[0, 6:].tolist()) == {0}


def test_latents(tmp_path):
    path = write_latents(tmp_path / "lat.npy", seed=3)
    lat = np.load(path)
    assert lat.shape == TINY_LATENT_SHAPE and lat.dtype == np.float32
    np.testing.assert_array_equal(lat, make_latents(3))
    assert not np.array_equal(lat, make_latents(4))


def test_generate_offline(backend):
    lat = make_latents(0)
    img = backend.generate(DEFAULT_PROMPT, lat, steps=2, guidance=5.0)
    assert img.shape == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3) and img.dtype == np.uint8
    assert img.std() > 5  # an image, not a flat colour
    np.testing.assert_array_equal(img, backend.generate(DEFAULT_PROMPT, lat, steps=2, guidance=5.0))


# ---------------------------------------------------------------- backend API


def test_protocol_and_availability(backend):
    assert TorchBackend.is_available() == (True, "")
    assert isinstance(backend, PipelineView)
    assert get_view("torch") is TorchBackend
    with pytest.raises(ValueError):
        ParityInputs(latents=make_latents(0))  # neither prompt nor ids
    inp = ParityInputs(latents=make_latents(0), prompt=DEFAULT_PROMPT, timesteps=999)
    assert inp.timesteps == (999.0,)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(LoraParityError, match="model_index.json"):
        TorchBackend(tmp_path)


def test_encode_prompt_and_text_activations(backend):
    embeds, pooled = backend.encode_prompt(DEFAULT_PROMPT)
    assert embeds.shape == (1, 77, 64) and pooled.shape == (1, 32)
    assert embeds.dtype == pooled.dtype == np.float32
    ids, ids2 = backend.tokenize(DEFAULT_PROMPT)
    e2, p2 = backend.encode_prompt(input_ids=ids, input_ids_2=ids2)
    np.testing.assert_array_equal(embeds, e2)
    np.testing.assert_array_equal(pooled, p2)

    acts = backend.text_encoder_activations(DEFAULT_PROMPT)
    expected = [f"text_encoder.hidden_states.{i}" for i in range(4)] + [
        "text_encoder.last_hidden_state", "text_encoder.pooler_output"] + [
        f"text_encoder_2.hidden_states.{i}" for i in range(4)] + [
        "text_encoder_2.last_hidden_state", "text_encoder_2.text_embeds"]
    assert acts.names() == expected
    assert all(v.dtype == np.float64 for v in acts.values.values())
    assert acts["text_encoder.pooler_output"].shape == acts["text_encoder_2.text_embeds"].shape == (1, 32)
    assert acts.select("text_encoder_2").names() == expected[6:]
    # prompt_embeds = concat of both encoders' penultimate hidden states
    np.testing.assert_allclose(embeds[..., :32], acts["text_encoder.hidden_states.2"], rtol=SAME_FRAMEWORK.rtol, atol=SAME_FRAMEWORK.atol)
    np.testing.assert_allclose(embeds[..., 32:], acts["text_encoder_2.hidden_states.2"], rtol=SAME_FRAMEWORK.rtol, atol=SAME_FRAMEWORK.atol)
    np.testing.assert_allclose(pooled, acts["text_encoder_2.text_embeds"], rtol=SAME_FRAMEWORK.rtol, atol=SAME_FRAMEWORK.atol)


def test_add_time_ids(backend):
    np.testing.assert_array_equal(backend.add_time_ids((32, 32), (0, 0), (32, 32)),
                                  np.array([[32, 32, 0, 0, 32, 32]], np.float32))
    np.testing.assert_array_equal(backend.add_time_ids((64, 48), (2, 3), (32, 16)),
                                  np.array([[64, 48, 2, 3, 32, 16]], np.float32))


def test_unet_activation_names_and_shapes(base_unet):
    assert isinstance(base_unet, Activations)
    assert base_unet.shapes() == EXPECTED_UNET
    assert list(base_unet.shapes()) == list(EXPECTED_UNET)  # forward order
    assert set(base_unet.components.values()) == {"unet"}
    for name, value in base_unet.values.items():
        assert value.dtype == np.float64 and np.all(np.isfinite(value)), name
        assert 1e-2 < value.std() < 50, (name, value.std())  # O(1) activations, nothing dead


def test_vae_decode_activations(backend):
    acts = backend.vae_decode_activations(make_latents(0))
    assert acts.shapes() == EXPECTED_VAE
    assert list(acts.shapes()) == list(EXPECTED_VAE)
    # the latents are divided by the scaling factor before post_quant_conv
    conv = backend.vae.post_quant_conv
    z = torch.from_numpy(make_latents(0)) / backend.vae.config.scaling_factor
    with torch.no_grad():
        np.testing.assert_allclose(acts["vae.post_quant_conv"], conv(z).double().numpy(), rtol=SAME_FRAMEWORK.rtol, atol=SAME_FRAMEWORK.atol)


def test_capture_helper_removes_hooks():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with capture(net, ["0", "2"], prefix="m.") as got:
        net(x)
        net(x)
    assert list(got) == ["m.0", "m.2", "m.0#1", "m.2#1"]
    assert got["m.2"].dtype == np.float64 and got["m.2"].shape == (5, 2)
    net(x)
    assert len(got) == 4  # hooks are gone
    with pytest.raises(KeyError):
        with capture(net, ["nope"]):
            pass


# ---------------------------------------------------------------- LoRA


def test_lora_changes_activations(tmp_path, tiny_dir, cond, base_unet):
    lora = _peft_lora(tmp_path / "lora.safetensors")
    b = TorchBackend(tiny_dir, lora=lora)
    assert b.lora_report.loaded == (f"unet.{LORA_MODULE}.lora_A.weight", f"unet.{LORA_MODULE}.lora_B.weight")
    acts = b.unet_activations(make_latents(0), 999.0, *cond)
    names = list(EXPECTED_UNET)
    first = names.index("unet.down_blocks.1.attentions.0")
    for name in names[:first]:  # upstream of the LoRA: bitwise unchanged
        np.testing.assert_array_equal(acts[name], base_unet[name], err_msg=name)
    for name in names[first:]:
        assert np.abs(acts[name] - base_unet[name]).max() > LORA_EFFECT_MIN_ABS, name


def test_lora_with_unknown_module_raises(tmp_path, backend, cond, base_unet):
    g = torch.Generator().manual_seed(2)
    bad = _peft_lora(tmp_path / "bad.safetensors", extra={
        "unet.down_blocks.7.attentions.0.to_q.lora_A.weight": torch.randn(RANK, 64, generator=g),
        "unet.down_blocks.7.attentions.0.to_q.lora_B.weight": torch.randn(64, RANK, generator=g),
    })
    with pytest.raises(LoraLoadError) as err:
        backend.load_lora(bad)
    msg = str(err.value)
    assert str(bad) in msg and "2 of 4 LoRA tensors not used" in msg
    assert "unet.down_blocks.7.attentions.0.to_q.lora_A.weight" in msg
    # the failed load was rolled back: the base model computes what it did before
    after = backend.unet_activations(make_latents(0), 999.0, *cond)
    np.testing.assert_array_equal(after["unet.conv_out"], base_unet["unet.conv_out"])


def test_lora_with_unrecognised_prefix_raises(tmp_path, backend):
    g = torch.Generator().manual_seed(3)
    path = tmp_path / "prefix.safetensors"
    save_file({f"model.{LORA_MODULE}.lora_A.weight": torch.randn(RANK, 64, generator=g),
               f"model.{LORA_MODULE}.lora_B.weight": torch.randn(64, RANK, generator=g)}, str(path))
    with pytest.raises(LoraLoadError, match="no LoRA weight was injected"):
        backend.load_lora(path)


def test_lora_that_diffusers_rejects_raises(tmp_path, backend):
    path = tmp_path / "shape.safetensors"
    save_file({f"unet.{LORA_MODULE}.lora_A.weight": torch.ones(RANK, 32),  # in=64 in the model
               f"unet.{LORA_MODULE}.lora_B.weight": torch.ones(64, RANK)}, str(path))
    with pytest.raises(LoraLoadError, match="diffusers refused the LoRA"):
        backend.load_lora(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraLoadError, match="not a readable safetensors"):
        backend.load_lora(tmp_path / "junk.safetensors")
