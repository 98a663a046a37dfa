"""Run one side's capture, in a child process by default.

A child per side means the two frameworks never hold their models in one address space
(full-size SDXL fits a 24 GB machine only that way), each side's peak memory is its own,
and a framework's global state (MindSpore's device, torch's threads) cannot leak into the
other side.  The child gets a request folder and writes a result folder (JSON +
safetensors, no pickle); a user error in the child comes back as the same one-line error.
``python -m lora_parity.sides REQUEST_DIR RESULT_DIR`` is that child.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lora_parity.errors import LoraParityError
from lora_parity.sides.request import SideRequest, SideResult

ERROR_FILE = "error.txt"


def capture(req: SideRequest) -> SideResult:
    """Run the backend named by ``req`` in this process; the result records the inputs' fingerprint."""
    from lora_parity.backends.registry import get_backend

    fingerprint = req.fingerprint()  # before the side adds token ids of its own (replay references excluded)
    try:
        backend = get_backend(req.backend_name)
    except ValueError as exc:
        raise LoraParityError(str(exc)) from None
    out = backend.capture(req)
    out.meta["inputs"] = fingerprint
    out.meta["replay_refs"] = req.refs_digest()
    out.meta.setdefault("backend", backend.name)
    if req.lora:
        out.meta["lora_modules"] = lora_modules(req)
    return out


def lora_modules(req: SideRequest) -> list[str]:
    """The modules the side's LoRA file holds (SGM names), read from the file by the key map: the blocks whose
    LoRA effect the judge measures come from the file itself, not from what a loader took."""
    from lora_parity.convert.converter import load_lora
    from lora_parity.convert.layout import layout_from_pipeline_dir

    path = Path(req.lora)
    # the EMA choice selects within a MindONE checkpoint; a side given a converted PEFT / kohya file already
    # holds the chosen set (compare converted it with the same choice)
    lora = load_lora(path, layout=layout_from_pipeline_dir(Path(req.pipeline_dir)), alpha=req.alpha,
                     ema=req.ema if path.suffix == ".ckpt" else None)
    return sorted(lora.pairs)


def run_side(req: SideRequest, *, isolate: bool = True, python: str | None = None) -> SideResult:
    """The side's result; in a child process (``python``, default this interpreter) unless ``isolate`` is off.

    The child imports this very ``lora_parity`` (put first on its path through a folder holding
    only a link to the package), also when ``python`` is another environment's interpreter:
    both sides of a comparison run the same project code, and nothing else of this
    environment leaks into the other one.
    """
    if not isolate:
        return capture(req)
    with tempfile.TemporaryDirectory(prefix=f"lora-parity-{req.side}-") as tmp:
        request, result = Path(tmp) / "request", Path(tmp) / "result"
        req.save(request)
        path_dir = Path(tmp) / "path"
        path_dir.mkdir()
        (path_dir / "lora_parity").symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(path_dir) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [python or sys.executable, "-m", "lora_parity.sides", str(request), str(result)]
        proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL)
        err = result / ERROR_FILE
        if proc.returncode != 0:
            if err.is_file():
                raise LoraParityError(err.read_text().strip())
            raise LoraParityError(f"the {_label(req)} side stopped with exit code {proc.returncode} "
                                  f"(its messages are above)")
        return SideResult.load(result)


def _label(req: SideRequest) -> str:
    return {"diffusers": "PyTorch", "port": "MindSpore", "mindone": "mindone"}.get(req.backend_name, req.side)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    request, result = Path(argv[0]), Path(argv[1])
    result.mkdir(parents=True, exist_ok=True)
    try:
        out = capture(SideRequest.load(request))
    except LoraParityError as exc:
        (result / ERROR_FILE).write_text(str(exc) + "\n")
        return exc.exit_code
    out.save(result)
    return 0


def quiet_environment() -> None:
    """The environment half of :func:`quiet_frameworks`: cheap (imports nothing), inherited by children.

    Enough for a process that never imports transformers/diffusers itself (``compare``'s parent,
    the MindSpore side); the PyTorch side adds the logging half in :func:`capture`.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_frameworks() -> None:
    """No weight-loading bars or import chatter from transformers/diffusers; denoising bars are ours.

    Call it before transformers or diffusers is imported: transformers reads
    ``TRANSFORMERS_VERBOSITY`` when its logging is first configured, huggingface_hub reads
    ``HF_HUB_DISABLE_PROGRESS_BARS`` at import, and an import-time warning (transformers 5's
    "`CLIPImageProcessor` requires torchvision", printed when diffusers' SDXL pipeline module
    is imported) cannot be unprinted.  The variables are inherited by the side processes.
    Silencing loses nothing that matters: a component's missing / unexpected / mismatched
    weights come back as a LoraParityError from the loading info (``pt_side.check_loading_info``),
    not from these log lines.  A verbosity the user set in the environment is kept.
    """
    user_set = {v for v in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY") if v in os.environ}
    quiet_environment()
    try:
        from transformers.utils import logging as tlog

        if "TRANSFORMERS_VERBOSITY" not in user_set:
            tlog.set_verbosity_error()
        tlog.disable_progress_bar()  # "Loading weights", "Writing model shards"
    except ImportError:
        pass
    try:
        from diffusers.utils import logging as dlog

        if "DIFFUSERS_VERBOSITY" not in user_set:
            dlog.set_verbosity_error()
        dlog.disable_progress_bar()  # "Loading pipeline components"; pipelines' own bars are set per call
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
