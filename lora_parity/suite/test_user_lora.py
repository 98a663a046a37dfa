"""The real-checkpoint layer: every check of YOUR LoRA that needs no base weights and no NPU.

    pytest --pyargs lora_parity -m conversion --lora-ckpt ~/my_lora.ckpt [--lora-alpha A | --lora-scale S]
           [--lora-layout SPEC]

The family (SDXL base / refiner, SD 1.x, SD 2.x, SD3, Flux) is detected from the file's names and shapes and
every check below that exists for it runs: the key map, the round trips through the MindONE spelling of that
family (gm's lora_A / lora_B for SDXL, the LDM port's lora_down / lora_up for SD 1.x / 2.x; SD3 and Flux have no
MindONE .ckpt LoRA -- mindone.diffusers saves PEFT -- so theirs is PEFT -> kohya -> PEFT) and diffusers' own loader
on a real-size hollow pipeline of that family.  A check that does not exist for a family is skipped with a reason
naming the family, never passed.

One named test per check, each skipped (reason naming ``--lora-ckpt``) without the option.  A
check that cannot run because an earlier one failed is skipped naming that test, so a fault
fails the test that is about it.  With ``--base SPEC`` (older name ``--sdxl-base``) too, the parity and image
layers run
on that base (``-m "parity or image"``).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from lora_parity.convert import formats
from lora_parity.errors import LoraParityError
from lora_parity.suite.checks import (LoraCheckScopeWarning, LoraContentWarning, LoraCoverageWarning, StageFailed,
                                      UserLora, bitwise_diff, check_adapter, compare_adapters, convert_to,
                                      hollow_pipeline, kohya_subset_for_diffusers)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
conversion = pytest.mark.conversion  # per test: the last test is the parity / image layer

NO_OPTION = ("no --lora-ckpt PATH given: this layer checks your own LoRA "
             "(pytest --pyargs lora_parity -m conversion --lora-ckpt my_lora.ckpt)")


@pytest.fixture(scope="module")
def user(lora_ckpt_option, request) -> UserLora:
    if lora_ckpt_option is None:
        pytest.skip(NO_OPTION)
    cfg = request.config
    ema = {"ema": True, "trained": False, None: None}[cfg.getoption("--lora-ema")]
    layout = cfg.getoption("--lora-layout")
    return UserLora(lora_ckpt_option, layout=None if layout is None else str(Path(layout).expanduser()),
                    alpha=cfg.getoption("--lora-alpha"), ema=ema, lora_scale=cfg.getoption("--lora-scale"))


def _need(user: UserLora, *stages: str):
    try:
        user.require(*stages)
    except StageFailed as exc:
        pytest.skip(str(exc))


def _fail(message: str) -> None:
    """A failed check: its message, without the test's traceback (the message names file and key), and without
    the error it was caught from (called inside ``except``, pytest would print the same line twice)."""
    raise pytest.fail.Exception(message, pytrace=False) from None


def _say(summary: list[str], line: str) -> None:
    if line not in summary:
        summary.append(line)


# ---------------------------------------------------------------- the file itself


@conversion
def test_file_parses(user, record_property, lora_summary):
    """The container parses record by record (no truncated record, no corrupt length, not encrypted) and
    holds LoRA tensors in a known naming (MindONE, PEFT or kohya)."""
    try:
        fr = user.read()
    except LoraParityError as exc:
        _fail(f"the file does not parse: {exc}")
    h = fr.halves
    record_property("container", fr.container)
    record_property("lora_format", fr.fmt)
    record_property("tensors", len(fr.tensors))
    record_property("bytes", fr.size)
    record_property("lora_modules", len(h.modules))
    ignored = {k: len(v) for k, v in h.ignored.items() if v}
    if ignored:
        record_property("ignored", ignored)
    for note in h.notes:
        record_property("note", note)
    _say(lora_summary, f"file: {fr.container}, {fr.size:,} bytes, {len(fr.tensors)} tensors; {fr.fmt} LoRA names, "
                       f"{len(h.modules)} modules" + (f"; not LoRA: {ignored}" if ignored else ""))
    if not h.modules:
        _fail("no LoRA module in the file")


@conversion
def test_no_nan_or_inf(user, record_property):
    """No LoRA tensor (lora_A / lora_B, trained bias, alpha) holds NaN or Inf: a diverged training
    step saves them silently, and they would turn every image black."""
    _need(user, "read")
    bad = user.nonfinite()
    record_property("nonfinite_tensors", len(bad))
    if bad:
        _fail(f"{len(bad)} LoRA tensor(s) hold NaN or Inf: {', '.join(bad[:5])}")


@conversion
def test_not_cut_short(user, record_property):
    """The file is whole: every module has both halves, and the modules its own pattern implies are
    not missing from some point on.  A MindSpore ``.ckpt`` cut at a record boundary still parses
    (MindSpore's own ``load_checkpoint`` loads it without a word), so this is the only place it shows."""
    _need(user, "read")
    halves = user.half_modules()
    if halves:
        _fail("the file looks partial (cut between two records?): " + "; ".join(halves[:3])
              + (f" and {len(halves) - 3} more" if len(halves) > 3 else ""))
    try:
        user.layout()
    except LoraParityError:
        pytest.skip("no layout to compare the file's modules with (see test_layout_detected)")
    why = user.cut_inside_block()
    record_property("looks_partial", why is not None)
    if why is not None:
        _fail(why)


# ---------------------------------------------------------------- names and shapes


@conversion
def test_layout_detected(user, record_property, lora_summary):
    """The model the LoRA was trained on (SDXL base or refiner, SD 1.5, SD 2.1, SD3-medium, FLUX.1-dev) is detected
    from names and shapes, or taken from ``--lora-layout``; the family and what was chosen and why are recorded."""
    _need(user, "read")
    try:
        layout, note, n = user.layout()
    except LoraParityError as exc:
        _fail(str(exc))
    record_property("layout", layout.name)
    record_property("family", layout.family)
    record_property("layout_note", note)
    _say(lora_summary, f"layout: {note}; family {layout.family}")


@conversion
def test_tensors_fit_the_layout(user, record_property):
    """Every mapped module's lora_A / lora_B have the shapes of that module at one rank, one dtype per
    pair; fused OpenCLIP in_proj LoRAs are whole."""
    try:
        lora = user.resolved()
    except StageFailed as exc:
        pytest.skip(str(exc))
    except LoraParityError as exc:
        _fail(str(exc))
    record_property("modules_fitting", len(lora.pairs))


@conversion
def test_every_key_maps(user, record_property, lora_summary):
    """Strict: every LoRA key of the file maps to a module of the layout (the converter refuses the file
    otherwise); non-LoRA entries (optimizer state, counters, base weights) are listed, not converted."""
    try:
        lora = user.strict()
    except StageFailed as exc:
        pytest.skip(str(exc))
    except LoraParityError as exc:
        _fail(str(exc))
    record_property("modules_mapped", len(lora.pairs))
    record_property("skipped_entries", len(lora.skipped))
    _say(lora_summary, f"mapped: {len(lora.pairs)} modules, every LoRA key" +
         (f"; {len(lora.skipped)} non-LoRA entries skipped" if lora.skipped else ""))


@conversion
def test_coverage_vs_mindone_training(user, record_property, lora_summary):
    """Modules per block and kind; warns (LoraCoverageWarning) when the file covers less than MindONE
    trains for that family by default: to_q / to_k / to_v / to_out.0 of every UNet attention (SDXL, SD 1.x / 2.x;
    gm and the LDM port); SD3: to_q / to_k / to_v / to_out.0 of every transformer attention
    (``train_dreambooth_lora_sd3.py``); Flux: both streams' attention projections and feed-forwards of the double
    blocks plus the single blocks' attention (``train_dreambooth_lora_flux.py`` without ``--lora_layers``).  Text
    encoders are trained only on request (``--train_text_encoder``), so they are listed, never required."""
    _need(user, "resolved")
    lines, info = user.coverage()
    for key, value in info.items():
        record_property(f"coverage.{key}", value)
    record_property("coverage_table", "\n".join(lines))
    what = info["mindone_default_is"]
    _say(lora_summary, f"coverage: {info['modules']} modules; MindONE's default ({what}): "
                       f"{info['mindone_default_covered']}/{info['mindone_default']}")
    for line in lines:
        _say(lora_summary, "  " + line)
    if info["mindone_default_covered"] < info["mindone_default"]:
        blocks = info["lacking_blocks"]
        warnings.warn(LoraCoverageWarning(
            f"the LoRA covers {info['mindone_default_covered']} of the {info['mindone_default']} modules MindONE "
            f"trains by default ({what}); none or not all in {', '.join(blocks[:6])}"
            f"{' ...' if len(blocks) > 6 else ''} (fine if trained that way on purpose; a copy cut at a block "
            f"boundary looks the same)"))


@conversion
def test_rank_and_alpha(user, record_property, lora_summary):
    """Ranks, alphas, scale alpha/rank and dtypes; every rank fits its module (1 <= r <= min(in, out))."""
    _need(user, "resolved")
    lora = user.resolved()
    ranks, alphas, dtypes = lora.ranks(), lora.alphas(), lora.dtypes()
    record_property("ranks", dict(ranks))
    record_property("alphas", {str(k): v for k, v in alphas.items()})
    record_property("dtypes", dict(dtypes))
    scales = sorted({p.alpha / p.rank for p in lora.pairs.values()})
    record_property("scales", scales)
    ldm = lora.source_format == "ms" and formats.ms_style(lora) == "ldm"
    src = ("--lora-alpha" if user.alpha is not None else "--lora-scale x rank" if user.lora_scale is not None else
           "MindONE's SD 1.x / 2.x LoRA stores a scale nowhere: scale 1 (its default) assumed, pass --lora-scale S"
           if ldm else "not stored in a MindONE .ckpt: alpha = rank assumed (scale 1), pass --lora-alpha A"
           if lora.source_format == "ms" else "from the file")
    _say(lora_summary, f"rank: {dict(sorted(ranks.items()))}  alpha: {dict(sorted(alphas.items()))} ({src})  "
                       f"scale alpha/rank: {', '.join(f'{s:g}' for s in scales)}  dtype: {dict(dtypes)}")
    bad = [f"{p.module.sgm} rank {p.rank}" for p in lora.ordered()
           if not 1 <= p.rank <= min(p.module.out_features, int(np.prod(p.A.shape[1:])))]
    if bad:
        _fail(f"rank larger than the module: {', '.join(bad[:5])}")


@conversion
def test_lora_b_is_trained(user, record_property):
    """lora_B is not all zeros: MindONE initialises it to zero, so an untrained (or step-0) save changes
    nothing.  Fails if every module's lora_B is zero, warns if some are."""
    _need(user, "resolved")
    lora = user.resolved()
    zero = [p.module.sgm for p in lora.ordered() if not p.B.to_float().any()]
    record_property("zero_lora_b", len(zero))
    if len(zero) == len(lora.pairs):
        _fail("every lora_B is all zeros: the LoRA changes nothing (saved before training?)")
    if zero:
        warnings.warn(LoraContentWarning(f"{len(zero)} of {len(lora.pairs)} modules have an all-zero lora_B "
                                         f"(untrained): {', '.join(zero[:3])}"))


# ---------------------------------------------------------------- conversions


@pytest.fixture(scope="module")
def converted(user, tmp_path_factory):
    """fmt -> (path, None) or (None, error): the user's file through the converter to MindONE (if it is not
    one), PEFT and kohya, and each of those back to MindONE.  SD3 / Flux (no MindONE .ckpt LoRA exists): the file
    as PEFT (itself, or converted), that PEFT to kohya, and the kohya file back to PEFT."""
    _need(user, "strict")
    d = tmp_path_factory.mktemp("converted")
    kw = dict(layout=user.layout_spec)
    out = {}

    def run(name, src, fmt, **extra):
        dst = d / (f"{name}.ckpt" if fmt == "ms" else f"{name}.safetensors")
        try:
            convert_to(src, dst, fmt, **kw, **extra)
            out[name] = (dst, None)
        except LoraParityError as exc:
            out[name] = (None, exc)

    fr = user.read()
    if user.strict().layout.is_transformer:
        if fr.fmt == "peft":
            out["peft"] = (user.path, None)
        else:
            run("peft", user.path, "peft", alpha=user.alpha)
        first, err = out["peft"]
        if first is None:
            out["kohya"] = out["kohya_back"] = (None, err)
            return out
        run("kohya", first, "kohya", alpha=user.alpha if first == user.path else None)
        if out["kohya"][0] is not None:
            run("kohya_back", out["kohya"][0], "peft")
        else:
            out["kohya_back"] = out["kohya"]
        return out
    if fr.fmt == "ms":
        out["ms"] = (user.path, None)
    else:
        run("ms", user.path, "ms", alpha=user.alpha)
    first, err = out["ms"]
    for fmt in ("peft", "kohya"):
        if first is None:
            out[fmt] = (None, err)
            continue
        if fr.fmt == "ms":
            extra = dict(alpha=user.alpha, ema=user.ema, lora_scale=user.lora_scale)
        else:  # the MindONE copy stores no alpha: give it the source's, as a user would at inference
            alphas = user.strict().alphas()
            extra = dict(alpha=next(iter(alphas))) if len(alphas) == 1 else {}
        run(fmt, first, fmt, **extra)
        if out[fmt][0] is not None:
            run(f"{fmt}_back", out[fmt][0], "ms")
        else:
            out[f"{fmt}_back"] = out[fmt]
    return out


def _round_trip(user, converted, fmt, record_property):
    for name in ("ms", fmt, f"{fmt}_back"):
        path, err = converted[name]
        if err is not None:
            _fail(f"the converter refused it ({name}): {err}")
    lora = user.strict()
    expected = formats.tensors_for(lora, "ms")[0]
    got = formats.read_tensors(converted[f"{fmt}_back"][0])[0]
    problems = bitwise_diff(expected, got)
    fr = user.read()
    if fr.fmt == "ms":  # the tensors the reader took, by their keys in the file (EMA, prefixes, ...)
        h, start = fr.halves, fr.tensors
        spelled = {"A": "down", "B": "up"} if formats.ms_style(lora) == "ldm" else {"A": "A", "B": "B"}
        taken = [(h.keys[m][half], f"{m}.lora_{spelled[half]}.weight") for m in h.modules for half in ("A", "B")]
        taken += [(h.bias_keys[m], f"{m}.bias") for m in h.biases]
    else:
        start = formats.read_tensors(converted["ms"][0])[0]
        taken = [(k, k) for k in expected if k in start]
    same_name = [(fk, ek) for fk, ek in taken if ek in expected]
    problems += [f"changed on the way in: {fk}" for fk, ek in same_name if not start[fk].bitwise_equal(expected[ek])]
    record_property("tensors_compared", len(expected))
    record_property("compared_with_file_keys", len(same_name))
    if problems:
        _fail(f"{len(problems)} problem(s): " + "; ".join(problems[:5]))


def _flow_round_trip(user, converted, record_property):
    """SD3 / Flux: the file as PEFT -> kohya -> PEFT gives its tensors back bit for bit, alpha and rank (the PEFT
    adapter metadata) too; the file's own tensors went in unchanged (compared by key with what the converter
    writes in the file's format)."""
    for name in ("peft", "kohya", "kohya_back"):
        path, err = converted[name]
        if err is not None:
            _fail(f"the converter refused it ({name}): {err}")
    lora = user.strict()
    expected, meta = formats.tensors_for(lora, "peft")
    got, got_meta = formats.read_tensors(converted["kohya_back"][0])[:2]
    problems = bitwise_diff(expected, got)
    want_cfg = json.loads(meta[formats.ADAPTER_METADATA_KEY])
    got_cfg = json.loads(got_meta.get(formats.ADAPTER_METADATA_KEY, "{}"))
    problems += [f"adapter metadata {k}: {got_cfg.get(k)!r}, expected {v!r}" for k, v in want_cfg.items()
                 if got_cfg.get(k) != v]
    fr = user.read()
    mine = formats.tensors_for(lora, fr.fmt)[0]  # the file's LoRA as the converter spells the file's format
    same_name = [k for k in mine if k in fr.tensors]
    problems += [f"changed on the way in: {k}" for k in same_name if not fr.tensors[k].bitwise_equal(mine[k])]
    record_property("tensors_compared", len(expected))
    record_property("compared_with_file_keys", len(same_name))
    if problems:
        _fail(f"{len(problems)} problem(s): " + "; ".join(problems[:5]))


def _no_mindone_ckpt(user) -> None:
    """SD3 / Flux: no MindONE .ckpt LoRA to round-trip through (mindone.diffusers saves PEFT): say so, by family."""
    layout = user.strict().layout
    if layout.is_transformer:
        pytest.skip(f"your LoRA is for {layout.family}: MindONE has no .ckpt LoRA format for {layout.family} "
                    f"(mindone.diffusers saves PEFT, your file's own format), so there is no MindONE -> PEFT -> "
                    f"MindONE round trip; PEFT -> kohya -> PEFT is test_round_trip_ms_kohya_ms_bitwise")


@conversion
def test_round_trip_ms_peft_ms_bitwise(user, converted, record_property):
    """MindONE -> PEFT (diffusers) -> MindONE gives the file's LoRA tensors back bit for bit (names,
    dtypes, shapes, bytes).  SD3 / Flux: skipped naming the family -- MindONE has no .ckpt LoRA for them
    (mindone.diffusers saves PEFT), their round trip is the kohya one below."""
    _no_mindone_ckpt(user)
    _round_trip(user, converted, "peft", record_property)


@conversion
def test_round_trip_ms_kohya_ms_bitwise(user, converted, record_property):
    """MindONE -> kohya (ComfyUI / A1111) -> MindONE gives the file's LoRA tensors back bit for bit.  SD3 / Flux:
    there is no MindONE .ckpt LoRA (mindone.diffusers saves PEFT), so the round trip is through the format
    mindone saves instead: PEFT -> kohya (``lora_transformer_``, ComfyUI's names) -> PEFT, bit for bit, with
    alpha and rank kept in the adapter metadata."""
    if user.strict().layout.is_transformer:
        _flow_round_trip(user, converted, record_property)
        return
    _round_trip(user, converted, "kohya", record_property)


# ---------------------------------------------------------------- diffusers


@pytest.fixture(scope="module")
def loaded(user, converted, tmp_path_factory):
    """A real-size hollow pipeline of the LoRA's family with the PEFT file loaded as adapter 'peft' and the kohya
    file as adapter 'kohya', by diffusers' own ``load_lora_weights``; errors kept per adapter.  Flux: the kohya
    adapter is the part of the kohya file diffusers' Flux kohya reader maps (written by the converter's own
    writer), and ``kohya_left_out`` names the rest; SD3: no kohya adapter (diffusers reads no kohya SD3 file)."""
    pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'lora-parity[test]')")
    pytest.importorskip("peft", reason="peft is not installed (pip install 'lora-parity[test]')")
    from lora_parity.backends.diffusers.view import load_lora_checked

    lora = user.strict()
    try:
        pipe = hollow_pipeline(lora.layout, user.layout_spec)
    except LoraParityError as exc:
        pytest.skip(str(exc))
    files = {"peft": converted["peft"], "kohya": converted["kohya"]}
    info = {"kohya_lora": lora, "kohya_left_out": []}
    if lora.layout.family == "sd3":
        files.pop("kohya")
    elif lora.layout.family == "flux" and converted["kohya"][1] is None:
        subset, left = kohya_subset_for_diffusers(lora)
        info.update(kohya_lora=subset, kohya_left_out=left)
        path = tmp_path_factory.mktemp("kohya_subset") / "kohya_diffusers_reads.safetensors"
        files["kohya"] = (path, None) if subset.pairs else (None, None)
        if subset.pairs:
            try:
                formats.write(path, subset, "kohya")
            except LoraParityError as exc:
                files["kohya"] = (None, exc)
    errors = {}
    for fmt, (path, err) in files.items():
        if err is None and path is not None:
            try:
                load_lora_checked(pipe, path, adapter_name=fmt)
            except LoraParityError as exc:
                err = exc
        errors[fmt] = err
    return pipe, errors, info


@conversion
def test_diffusers_loads_peft_on_real_size_pipeline(user, loaded, record_property):
    """diffusers' ``load_lora_weights`` takes the PEFT file on a real-size pipeline of the LoRA's family
    (SDXL, SD 1.x / 2.x; SD3 / Flux: the transformer and CLIP encoders, meta-device modules, no weights): every
    tensor lands on the module the key map names, the base layer's shape fits, values equal the file's,
    scale = alpha/rank, and no other module gets a LoRA.  Neither SD3's nor Flux's loader takes a T5 LoRA: T5
    tensors in the file fail here as tensors diffusers did not use."""
    pipe, errors, _ = loaded
    if errors["peft"] is not None:
        _fail(f"diffusers did not load the PEFT file: {errors['peft']}")
    problems, n = check_adapter(pipe, user.strict(), "peft")
    record_property("diffusers_modules", n)
    if problems:
        _fail(f"{len(problems)} problem(s): " + "; ".join(problems[:5]))


@conversion
def test_diffusers_kohya_path_same_modules(user, loaded, record_property, lora_summary):
    """The kohya file, read by diffusers' own kohya converter (which maps SGM block names itself), puts
    the same tensors with the same scale on the same modules as the PEFT file: an independent check of
    the key map.

    SD3: skipped naming the family (diffusers reads no kohya SD3 file; ComfyUI does, and the kohya file is
    checked by the round trip).  Flux: diffusers' Flux kohya reader maps the blocks' attention, the top-level
    Linears and CLIP-L only, and folds alpha/rank into the tensors: that part is written as a kohya file and
    must land on the modules the key map names with the file's tensors up to the folded factors; the modules it
    cannot read (feed-forwards, norms, T5) are counted, named in a LoraCheckScopeWarning and recorded
    (``kohya_not_read_by_diffusers``), not passed silently."""
    lora = user.strict()
    family = lora.layout.family
    if family == "sd3":
        pytest.skip("your LoRA is for sd3: diffusers reads no kohya SD3 file (its SD3 loader takes PEFT names "
                    "only; ComfyUI reads lora_transformer_ names), so this path cannot be checked in diffusers; "
                    "the kohya file is checked by test_round_trip_ms_kohya_ms_bitwise")
    pipe, errors, info = loaded
    subset, left = info["kohya_lora"], info["kohya_left_out"]
    record_property("kohya_not_read_by_diffusers", len(left))
    if family == "flux" and not subset.pairs:
        pytest.skip(f"your LoRA is for flux and none of its {len(left)} modules is one diffusers' Flux kohya reader "
                    f"maps (block attention, top-level Linears, CLIP-L), e.g. {left[0]}")
    if errors["kohya"] is not None:
        _fail(f"diffusers did not load the kohya file: {errors['kohya']}")
    folded = family == "flux"
    problems, n = check_adapter(pipe, subset, "kohya", folded_alpha=folded)
    if errors["peft"] is None and not left:
        more, n = compare_adapters(pipe, "peft", "kohya", values=not folded)
        problems += more
    record_property("diffusers_modules", n)
    if problems:
        _fail(f"{len(problems)} problem(s): " + "; ".join(problems[:5]))
    if left:
        _say(lora_summary, f"kohya in diffusers: {len(subset.pairs)} modules checked; {len(left)} not read by "
                           f"diffusers' {family} kohya reader (e.g. {left[0]})")
        warnings.warn(LoraCheckScopeWarning(
            f"diffusers' {family} kohya reader maps {len(subset.pairs)} of the {len(lora.pairs)} modules; the other "
            f"{len(left)} (e.g. {', '.join(left[:2])}) are checked by the PEFT load and the round trip only"))


# ---------------------------------------------------------------- with a base model


@pytest.mark.parity
@pytest.mark.image
def test_parity_and_image_on_your_base(user, converted, base_option, request, record_property, tmp_path):
    """With ``--base SPEC``: MindSpore (CPU unless ``--ms-device``) against diffusers on that base with
    your LoRA, layer by layer and as a 2-step image (``compare --steps 2``); the report is kept in the
    test's tmp folder.  SDXL LoRAs run on the port (``--ms-backend mindone`` for mindone.diffusers), SD 1.x /
    2.x, SD3 and Flux LoRAs on mindone.diffusers (the port is an SGM SDXL model).  Flux runs at ``--dtype fp16``:
    mindone computes Flux's attention in float16 (FlashAttentionScore on float16-cast inputs), so an fp32
    comparison would be refused (compare exits 2 naming it) -- both sides are judged at the precision mindone
    really runs."""
    if base_option is None:
        pytest.skip("no --base SPEC given (the base your LoRA was trained on: a diffusers folder, "
                    "sd_xl_base_1.0.safetensors or random:sdxl-base)")
    layout = user.strict().layout
    family = layout.family
    choice = request.config.getoption("--ms-backend")
    # the port is an SGM (SDXL) model: SD 1.x / 2.x, SD3 and Flux LoRAs are judged on mindone.diffusers
    backend = "port" if family == "sdxl" and choice in ("all", "port") else "mindone"
    if family != "sdxl" and choice == "port":
        pytest.skip(f"your LoRA is for {family}: the port runs SDXL only (--ms-backend mindone or all judges "
                    f"mindone.diffusers on your base)")
    from lora_parity.compare import CompareOptions, run_compare
    from lora_parity.parity.metrics import assert_report
    from lora_parity.suite.plugin import gate_overrides

    fmt = user.read().fmt
    if layout.is_transformer:  # mindone.diffusers loads PEFT: your own file, else its PEFT conversion
        ms_lora, err = (user.path, None) if fmt == "peft" else converted["peft"]
    else:
        ms_lora, err = converted["ms"]
        if backend == "mindone":  # it loads PEFT: your own file (MindONE .ckpt or PEFT), else the PEFT conversion
            ms_lora, err = (user.path, None) if fmt in ("ms", "peft") else converted["peft"]
    if err is not None:
        _fail(f"the converter refused it: {err}")
    dtype = "F16" if family == "flux" else "F32"
    record_property("dtype", dtype)
    cfg = request.config
    size = cfg.getoption("--parity-size")
    report = run_compare(CompareOptions(
        base=base_option, ms_lora=ms_lora, alpha=user.alpha, ema=user.ema if ms_lora == user.path else None,
        ms_backend=backend, lora_scale=user.lora_scale if ms_lora == user.path else None, dtype=dtype,
        steps=2, height=size, width=size, ms_device=cfg.getoption("--ms-device") or "CPU",
        report_dir=tmp_path, **gate_overrides(cfg)))
    record_property("report_json", str(tmp_path / "report.json"))
    assert_report(report, record_property)
    im = report.image
    for key in ("mae", "psnr", "ssim", "max_error", "mae_threshold"):
        record_property(f"image_{key}", im[key])
    if not im["passed"]:
        _fail(f"image MAE {im['mae']:.3f} >= {im['mae_threshold']}; images and heatmap in {tmp_path}")
