"""Name maps SGM (MindONE) <-> diffusers <-> kohya, generated from a layout.

Small exact tables (one per block type) are expanded by one generator walking
the UNet the way both frameworks build it, so conversion is a dict lookup and
the order of keys in a file never matters.  Every entry also carries the
module's shape, so a LoRA tensor can be checked against the architecture
before anything is written.  Norm layers are listed too (not LoRA-able) so the
full-weight converter can reuse the same walk.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from lora_parity.convert.layout import ModelLayout, TextEncoderLayout, TransformerLayout, UNetLayout
from lora_parity.errors import LoraParityError

UNET_SGM = "model.diffusion_model."
UNET_DIFFUSERS = "unet."
KOHYA_UNET = "lora_unet_"
#: SD3 / Flux: diffusers' (= mindone.diffusers') transformer prefix, and the kohya spelling ComfyUI reads
#: (OneTrainer's ``lora_transformer_`` + diffusers path with "." -> "_"; diffusers' Flux kohya reader too)
TRANSFORMER_DIFFUSERS = "transformer."
KOHYA_TRANSFORMER = "lora_transformer_"


@dataclass(frozen=True)
class ModuleEntry:
    """One Linear / Conv / Norm module, named in both layouts.

    ``diffusers`` has one name, or three for OpenCLIP's fused ``attn.in_proj``
    (q, k, v in that order, each ``out_features // 3`` rows).
    """

    sgm: str
    diffusers: tuple[str, ...]
    kind: str  # "linear" | "conv" | "norm"
    in_features: int
    out_features: int
    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    block: str  # SGM block label, for summaries and activation alignment
    kernel: tuple[int, int] = (1, 1)
    bias: bool = True

    @property
    def lora_able(self) -> bool:
        return self.kind in ("linear", "conv")

    @property
    def fused(self) -> bool:
        return len(self.diffusers) > 1

    def lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Expected (lora_A, lora_B) shapes for this module at ``rank``."""
        if self.kind == "conv":
            return (rank, self.in_features, *self.kernel), (self.out_features, rank, 1, 1)
        return (rank, self.in_features), (self.out_features, rank)

    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "conv":
            return (self.out_features, self.in_features, *self.kernel)
        if self.kind == "norm":
            return (self.out_features,)
        return (self.out_features, self.in_features)


# --- tables: (sgm suffix, diffusers suffix, kind, (in, out) from block channels, kernel, bias) ---

def _resblock(sgm: str, dif: str, cin: int, cout: int, temb: int, comp: str, block: str):
    rows = [
        ("in_layers.0", "norm1", "norm", cin, cin, (1, 1)),
        ("in_layers.2", "conv1", "conv", cin, cout, (3, 3)),
        ("emb_layers.1", "time_emb_proj", "linear", temb, cout, (1, 1)),
        ("out_layers.0", "norm2", "norm", cout, cout, (1, 1)),
        ("out_layers.3", "conv2", "conv", cout, cout, (3, 3)),
    ]
    if cin != cout:
        rows.append(("skip_connection", "conv_shortcut", "conv", cin, cout, (1, 1)))
    for s, d, kind, i, o, k in rows:
        yield ModuleEntry(f"{sgm}.{s}", (f"{dif}.{d}",), kind, i, o, comp, block, k)


def _transformer(sgm: str, dif: str, ch: int, ctx: int, depth: int, comp: str, block: str, linear: bool = True):
    proj_kind = "linear" if linear else "conv"  # SD 1.x: 1x1 Conv2d projections
    yield ModuleEntry(f"{sgm}.norm", (f"{dif}.norm",), "norm", ch, ch, comp, block)
    yield ModuleEntry(f"{sgm}.proj_in", (f"{dif}.proj_in",), proj_kind, ch, ch, comp, block)
    for t in range(depth):
        tb = f"transformer_blocks.{t}"
        for attn, kv_in in (("attn1", ch), ("attn2", ctx)):
            for proj, cin in (("to_q", ch), ("to_k", kv_in), ("to_v", kv_in)):
                name = f"{tb}.{attn}.{proj}"
                yield ModuleEntry(f"{sgm}.{name}", (f"{dif}.{name}",), "linear", cin, ch, comp,
                                  block, bias=False)
            name = f"{tb}.{attn}.to_out.0"
            yield ModuleEntry(f"{sgm}.{name}", (f"{dif}.{name}",), "linear", ch, ch, comp, block)
        for n in ("norm1", "norm2", "norm3"):
            yield ModuleEntry(f"{sgm}.{tb}.{n}", (f"{dif}.{tb}.{n}",), "norm", ch, ch, comp, block)
        yield ModuleEntry(f"{sgm}.{tb}.ff.net.0.proj", (f"{dif}.{tb}.ff.net.0.proj",), "linear",
                          ch, 8 * ch, comp, block)
        yield ModuleEntry(f"{sgm}.{tb}.ff.net.2", (f"{dif}.{tb}.ff.net.2",), "linear",
                          4 * ch, ch, comp, block)
    yield ModuleEntry(f"{sgm}.proj_out", (f"{dif}.proj_out",), proj_kind, ch, ch, comp, block)


def unet_entries(layout: UNetLayout):
    """Walk the UNet as SGM's ``UNetModel`` and diffusers' ``UNet2DConditionModel`` build it."""
    S, D, comp = UNET_SGM, UNET_DIFFUSERS, "unet"
    mc, temb, lpb, ctx = layout.model_channels, layout.time_embed_dim, layout.layers_per_block, layout.context_dim

    def lin(s, d, i, o, block):
        return ModuleEntry(S + s, (D + d,), "linear", i, o, comp, block)

    yield lin("time_embed.0", "time_embedding.linear_1", mc, temb, "time_embed")
    yield lin("time_embed.2", "time_embedding.linear_2", temb, temb, "time_embed")
    if layout.adm_in_channels:
        yield lin("label_emb.0.0", "add_embedding.linear_1", layout.adm_in_channels, temb, "label_emb")
        yield lin("label_emb.0.2", "add_embedding.linear_2", temb, temb, "label_emb")
    yield ModuleEntry(S + "input_blocks.0.0", (D + "conv_in",), "conv", layout.in_channels, mc, comp,
                      "input_blocks.0", (3, 3))

    skip_chans = [mc]
    ch = mc
    idx = 1
    for level in range(layout.levels):
        out_ch = layout.level_channels(level)
        depth = layout.transformer_depth[level]
        for j in range(lpb):
            blk = f"input_blocks.{idx}"
            dif = f"down_blocks.{level}"
            yield from _resblock(f"{S}{blk}.0", f"{D}{dif}.resnets.{j}", ch, out_ch, temb, comp, blk)
            ch = out_ch
            if depth:
                yield from _transformer(f"{S}{blk}.1", f"{D}{dif}.attentions.{j}", ch, ctx, depth, comp, blk, layout.linear_projection)
            skip_chans.append(ch)
            idx += 1
        if level != layout.levels - 1:
            blk = f"input_blocks.{idx}"
            yield ModuleEntry(f"{S}{blk}.0.op", (f"{D}down_blocks.{level}.downsamplers.0.conv",), "conv",
                              ch, ch, comp, blk, (3, 3))
            skip_chans.append(ch)
            idx += 1

    blk = "middle_block"
    yield from _resblock(f"{S}{blk}.0", f"{D}mid_block.resnets.0", ch, ch, temb, comp, blk)
    if layout.transformer_depth_middle:
        yield from _transformer(f"{S}{blk}.1", f"{D}mid_block.attentions.0", ch, ctx,
                                layout.transformer_depth_middle, comp, blk, layout.linear_projection)
        last = f"{S}{blk}.2"
    else:
        last = f"{S}{blk}.1"
    yield from _resblock(last, f"{D}mid_block.resnets.1", ch, ch, temb, comp, blk)

    idx = 0
    for up, level in enumerate(reversed(range(layout.levels))):
        out_ch = layout.level_channels(level)
        depth = layout.transformer_depth_up[level]
        for j in range(lpb + 1):
            blk = f"output_blocks.{idx}"
            dif = f"up_blocks.{up}"
            cin = ch + skip_chans.pop()
            yield from _resblock(f"{S}{blk}.0", f"{D}{dif}.resnets.{j}", cin, out_ch, temb, comp, blk)
            ch = out_ch
            slot = 1
            if depth:
                yield from _transformer(f"{S}{blk}.1", f"{D}{dif}.attentions.{j}", ch, ctx, depth, comp, blk, layout.linear_projection)
                slot = 2
            if level != 0 and j == lpb:
                yield ModuleEntry(f"{S}{blk}.{slot}.conv", (f"{D}{dif}.upsamplers.0.conv",), "conv",
                                  ch, ch, comp, blk, (3, 3))
            idx += 1

    yield ModuleEntry(S + "out.0", (D + "conv_norm_out",), "norm", ch, ch, comp, "out")
    yield ModuleEntry(S + "out.2", (D + "conv_out",), "conv", ch, layout.out_channels, comp, "out", (3, 3))


# --- SD3 / Flux transformer: one table per block type; widths are symbols resolved per layout ---
# (module path, in width, out width, present when) -- "text_out": not in SD3's context_pre_only last block;
# "dual": only in SD3.5's dual-attention blocks.  Every row is a Linear with a bias in both models.
_JOINT_BLOCK = (
    ("norm1.linear", "h", "norm1", None),
    ("norm1_context.linear", "h", "norm1_context", None),
    ("attn.to_q", "h", "h", None),
    ("attn.to_k", "h", "h", None),
    ("attn.to_v", "h", "h", None),
    ("attn.add_q_proj", "h", "h", None),
    ("attn.add_k_proj", "h", "h", None),
    ("attn.add_v_proj", "h", "h", None),
    ("attn.to_out.0", "h", "h", None),
    ("attn.to_add_out", "h", "h", "text_out"),
    ("attn2.to_q", "h", "h", "dual"),
    ("attn2.to_k", "h", "h", "dual"),
    ("attn2.to_v", "h", "h", "dual"),
    ("attn2.to_out.0", "h", "h", "dual"),
    ("ff.net.0.proj", "h", "ff", None),
    ("ff.net.2", "ff", "h", None),
    ("ff_context.net.0.proj", "h", "ff", "text_out"),
    ("ff_context.net.2", "ff", "h", "text_out"),
)
_SINGLE_BLOCK = (  # Flux single-stream block: attention and MLP side by side, one output projection
    ("norm.linear", "h", "3h", None),
    ("attn.to_q", "h", "h", None),
    ("attn.to_k", "h", "h", None),
    ("attn.to_v", "h", "h", None),
    ("proj_mlp", "h", "mlp", None),
    ("proj_out", "h+mlp", "h", None),
)
# top-level modules before and after the blocks: (module path, in, out, present when); "flux" / "sd3" /
# "guidance" gate them by model
_HEAD = (
    ("time_text_embed.timestep_embedder.linear_1", "t", "h", None),
    ("time_text_embed.timestep_embedder.linear_2", "h", "h", None),
    ("time_text_embed.guidance_embedder.linear_1", "t", "h", "guidance"),
    ("time_text_embed.guidance_embedder.linear_2", "h", "h", "guidance"),
    ("time_text_embed.text_embedder.linear_1", "pool", "h", None),
    ("time_text_embed.text_embedder.linear_2", "h", "h", None),
    ("context_embedder", "ctx", "cap", None),
    ("x_embedder", "in", "h", "flux"),
)
_TAIL = (
    ("norm_out.linear", "h", "2h", None),
    ("proj_out", "h", "out", None),
)
#: diffusers' sinusoidal timestep / guidance projection width (``Timesteps(num_channels=256)``)
TIMESTEP_PROJ_DIM = 256


def _widths(t: TransformerLayout, block: int | None = None) -> dict[str, int]:
    h = t.hidden_size
    dual = block is not None and block in t.dual_attention_layers
    return {"h": h, "2h": 2 * h, "3h": 3 * h, "ff": 4 * h, "mlp": t.mlp_hidden, "h+mlp": h + t.mlp_hidden,
            "t": TIMESTEP_PROJ_DIM, "pool": t.pooled_projection_dim, "ctx": t.joint_attention_dim,
            "cap": t.caption_projection_dim, "in": t.in_channels, "out": t.patch_size ** 2 * t.out_channels,
            # AdaLayerNormZero: 6 modulation vectors; SD3.5's dual variant 9; the pre-only context norm
            # (AdaLayerNormContinuous) 2
            "norm1": 9 * h if dual else 6 * h,
            "norm1_context": 2 * h if t.context_pre_only(block or 0) else 6 * h}


def _present(t: TransformerLayout, when: str | None, block: int | None = None) -> bool:
    if when is None:
        return True
    return {"text_out": block is not None and not t.context_pre_only(block),
            "dual": block is not None and block in t.dual_attention_layers,
            "guidance": t.guidance_embeds, "flux": t.kind == "flux", "sd3": t.kind == "sd3"}[when]


def _rows(t: TransformerLayout, table, prefix: str = "", block_label: str | None = None, block: int | None = None):
    """A table's rows present in this block; top-level modules are labelled by their first path segment."""
    w = _widths(t, block)
    for path, i, o, when in table:
        if _present(t, when, block):
            name = f"{TRANSFORMER_DIFFUSERS}{prefix}{path}"
            yield ModuleEntry(name, (name,), "linear", w[i], w[o], "transformer", block_label or path.split(".")[0])


def transformer_entries(t: TransformerLayout):
    """Every Linear of diffusers' SD3 / Flux transformer, in module order.  The MindSpore name is the diffusers
    name: mindone.diffusers builds the same module tree (``pos_embed.proj``, a patchifying conv no trainer
    adapts, is left out)."""
    yield from _rows(t, _HEAD)
    for n in range(t.num_layers):
        yield from _rows(t, _JOINT_BLOCK, f"transformer_blocks.{n}.", f"transformer_blocks.{n}", n)
    for n in range(t.num_single_layers):
        yield from _rows(t, _SINGLE_BLOCK, f"single_transformer_blocks.{n}.", f"single_transformer_blocks.{n}", n)
    yield from _rows(t, _TAIL)


def t5_entries(te: TextEncoderLayout):
    """transformers' ``T5EncoderModel``: self-attention q/k/v/o and the (gated) feed-forward, no biases."""
    comp = te.diffusers_prefix.rstrip(".")
    d, inner, ff = te.hidden_size, te.attention_dim or te.hidden_size, te.intermediate_size
    wi = (("wi_0", d, ff), ("wi_1", d, ff)) if te.gated_ffn else (("wi", d, ff),)
    rows = (*((f"layer.0.SelfAttention.{p}", d, inner) for p in "qkv"), ("layer.0.SelfAttention.o", inner, d),
            *((f"layer.1.DenseReluDense.{p}", i, o) for p, i, o in wi), ("layer.1.DenseReluDense.wo", ff, d))
    for n in range(te.num_layers):
        base = f"{te.diffusers_prefix}encoder.block.{n}"
        for path, i, o in rows:
            yield ModuleEntry(f"{base}.{path}", (f"{base}.{path}",), "linear", i, o, comp, f"{comp}.block.{n}",
                              bias=False)


#: Fused-q/k/v text encoders: (attention path, MLP prefix, resblock path) under the SGM prefix.
#: "openclip": SGM's OpenCLIP (``model.transformer.resblocks.N.attn.in_proj``, ``mlp.c_fc``);
#: "ldm": MindONE's SD 1.x / 2.x ``TextEncoder`` (``transformer.transformer_layer.resblocks.N.attn.attn.in_proj``,
#: ``c_fc`` directly under the block; MindONE ``tools/model_conversion/ms_names_v1.txt`` / ``_v2.txt``).
_FUSED_STYLES = {"openclip": ("attn", "mlp.", "transformer.resblocks"),
                 "ldm": ("attn.attn", "", "transformer_layer.resblocks")}


def text_encoder_entries(te: TextEncoderLayout):
    """CLIP-L keeps HF names under SGM's prefix; OpenCLIP-bigG uses resblocks with fused in_proj."""
    if te.style == "t5":
        yield from t5_entries(te)
        return
    comp = te.diffusers_prefix.rstrip(".")
    h, inter = te.hidden_size, te.intermediate_size
    for n in range(te.num_layers):
        hf = f"text_model.encoder.layers.{n}"
        dif = f"{te.diffusers_prefix}{hf}"
        block = f"{comp}.layers.{n}"
        if te.style == "hf":
            sgm = f"{te.sgm_prefix}{hf}"
            pairs = [(f"self_attn.{p}_proj", f"self_attn.{p}_proj", "linear", h, h) for p in "qkvo"[:3]]
            pairs += [("self_attn.out_proj", "self_attn.out_proj", "linear", h, h),
                      ("layer_norm1", "layer_norm1", "norm", h, h),
                      ("mlp.fc1", "mlp.fc1", "linear", h, inter),
                      ("mlp.fc2", "mlp.fc2", "linear", inter, h),
                      ("layer_norm2", "layer_norm2", "norm", h, h)]
            for s, d, kind, i, o in pairs:
                yield ModuleEntry(f"{sgm}.{s}", (f"{dif}.{d}",), kind, i, o, comp, block)
        else:  # fused q/k/v: OpenCLIP (SGM's bigG) or MindONE's LDM CLIP (SD 1.x / 2.x)
            attn, mlp, blocks = _FUSED_STYLES[te.style]
            sgm = f"{te.sgm_prefix}{blocks}.{n}"
            yield ModuleEntry(f"{sgm}.{attn}.in_proj",
                              tuple(f"{dif}.self_attn.{p}_proj" for p in "qkv"), "linear", h, 3 * h,
                              comp, block)
            for s, d, kind, i, o in ((f"{attn}.out_proj", "self_attn.out_proj", "linear", h, h),
                                     ("ln_1", "layer_norm1", "norm", h, h),
                                     (f"{mlp}c_fc", "mlp.fc1", "linear", h, inter),
                                     (f"{mlp}c_proj", "mlp.fc2", "linear", inter, h),
                                     ("ln_2", "layer_norm2", "norm", h, h)):
                yield ModuleEntry(f"{sgm}.{s}", (f"{dif}.{d}",), kind, i, o, comp, block)
    final = "text_model.final_layer_norm" if te.style == "hf" else "ln_final"
    yield ModuleEntry(f"{te.sgm_prefix}{final}", (f"{te.diffusers_prefix}text_model.final_layer_norm",),
                      "norm", h, h, comp, f"{comp}.final_layer_norm")


def kohya_name(entry: ModuleEntry, part: int = 0, *, te_prefixes: dict[str, str], unet_style: str = "sgm") -> str:
    """sd-scripts' naming: the UNet by SGM names (SDXL) or diffusers names (SD 1.x / 2.x, ``unet_style``),
    the text encoders by HF names; an SD3 / Flux transformer ``lora_transformer_`` + its diffusers path."""
    if entry.component == "transformer":
        return KOHYA_TRANSFORMER + entry.diffusers[0][len(TRANSFORMER_DIFFUSERS):].replace(".", "_")
    if entry.component == "unet":
        if unet_style == "diffusers":
            return KOHYA_UNET + entry.diffusers[0][len(UNET_DIFFUSERS):].replace(".", "_")
        return KOHYA_UNET + entry.sgm[len(UNET_SGM):].replace(".", "_")
    dif = entry.diffusers[part]
    return te_prefixes[entry.component] + dif.split(".", 1)[1].replace(".", "_")


def kohya_dotted_name(entry: ModuleEntry, part: int = 0, *, te_prefixes: dict[str, str],
                      unet_style: str = "sgm") -> str:
    """MindONE's sd-scripts port's ``.ckpt`` name: prefix + "." + the module's dotted path in its own model
    (SDXL UNet by SGM path, text encoders by HF path), i.e. :func:`kohya_name` before its dots became "_"."""
    if entry.component == "transformer":
        raise LoraParityError("MindONE's sd-scripts port has no SD3 / Flux networks: no dotted kohya .ckpt names "
                              "for a transformer")
    if entry.component == "unet":
        path = (entry.diffusers[0][len(UNET_DIFFUSERS):] if unet_style == "diffusers"
                else entry.sgm[len(UNET_SGM):])
        return KOHYA_UNET.rstrip("_") + "." + path
    return te_prefixes[entry.component].rstrip("_") + "." + entry.diffusers[part].split(".", 1)[1]


class KeyMap:
    """All modules of one model layout, indexed by SGM, diffusers and kohya names."""

    def __init__(self, layout: ModelLayout):
        self.layout = layout
        entries = (list(transformer_entries(layout.transformer)) if layout.is_transformer
                   else list(unet_entries(layout.unet)))
        for te in layout.text_encoders:
            entries.extend(text_encoder_entries(te))
        self.entries: tuple[ModuleEntry, ...] = tuple(entries)
        self.te_kohya = {te.diffusers_prefix.rstrip("."): te.kohya_prefix for te in layout.text_encoders}
        self.kohya_unet_style = layout.kohya_unet_style

    @cached_property
    def by_sgm(self) -> dict[str, ModuleEntry]:
        return {e.sgm: e for e in self.entries}

    @cached_property
    def by_diffusers(self) -> dict[str, tuple[ModuleEntry, int]]:
        return {d: (e, i) for e in self.entries for i, d in enumerate(e.diffusers)}

    @cached_property
    def by_kohya(self) -> dict[str, tuple[ModuleEntry, int]]:
        """sd-scripts names, plus the other UNet spelling (SGM / diffusers) some trainers write."""
        out: dict[str, tuple[ModuleEntry, int]] = {}
        for e in self.entries:
            if not e.lora_able:
                continue
            for i, d in enumerate(e.diffusers):
                out[kohya_name(e, i, te_prefixes=self.te_kohya, unet_style=self.kohya_unet_style)] = (e, i)
                if e.component == "unet":  # either UNet spelling is read, whatever the family writes
                    out[KOHYA_UNET + d[len(UNET_DIFFUSERS):].replace(".", "_")] = (e, i)
                    out[KOHYA_UNET + e.sgm[len(UNET_SGM):].replace(".", "_")] = (e, i)
                elif self.layout.family == "flux" and self.te_kohya.get(e.component) == "lora_te2_":
                    # ComfyUI reads a Flux T5 LoRA as lora_te2_ (OneTrainer) and as lora_te3_
                    out["lora_te3_" + d.split(".", 1)[1].replace(".", "_")] = (e, i)
        return out

    def lora_entries(self, component: str | None = None) -> list[ModuleEntry]:
        return [e for e in self.entries if e.lora_able and (component is None or e.component == component)]

    def attention_entries(self) -> list[ModuleEntry]:
        """What MindONE trains by default: q/k/v/out of every UNet attention; SD3 / Flux: every transformer
        attention projection (image and text side, mindone.diffusers' dreambooth LoRA targets)."""
        if self.layout.is_transformer:
            return [e for e in self.lora_entries("transformer") if ".attn." in e.sgm or ".attn2." in e.sgm]
        return [e for e in self.lora_entries("unet") if ".attn1." in e.sgm or ".attn2." in e.sgm]

    def block_counts(self, sgm_names) -> Counter:
        return Counter(self.by_sgm[n].block for n in sgm_names if n in self.by_sgm)


_CACHE: dict[ModelLayout, KeyMap] = {}


def keymap_for(layout: ModelLayout) -> KeyMap:
    """Key maps are pure functions of the (frozen, hashable) layout: build each once."""
    if layout not in _CACHE:  # keyed by the layout itself: equal layouts share, no hash collisions
        _CACHE[layout] = KeyMap(layout)
    return _CACHE[layout]
