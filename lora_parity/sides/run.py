"""Run one side's capture, in a child process by default.

A child per side means the two frameworks never hold their models in one address space
(full-size SDXL fits a 24 GB machine only that way), each side's peak memory is its own,
and a framework's global state (MindSpore's device, torch's threads) cannot leak into the
other side.  The child gets a request folder and writes a result folder (JSON +
safetensors, no pickle); a user error in the child comes back as the same one-line error.
``python -m lora_parity.sides REQUEST_DIR RESULT_DIR`` is that child.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from lora_parity.errors import LoraParityError
from lora_parity.sides.quiet import quiet_environment, quiet_frameworks  # noqa: F401  (re-exported)
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
    from lora_parity.parity.align import is_flow_folder

    if is_flow_folder(Path(req.pipeline_dir)):  # SD3 / Flux: PEFT names are the modules' diffusers names
        from lora_parity.convert.safetensors_io import read_safetensors

        tensors, _ = read_safetensors(path)
        return sorted({k.rsplit(".lora_", 1)[0].replace(".text_model.", ".")  # as the aligned points name them
                       for k in tensors if ".lora_A." in k or ".lora_B." in k})
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
    from lora_parity.sides import forkserver

    python = python or sys.executable
    with tempfile.TemporaryDirectory(prefix=f"lora-parity-{req.side}-") as tmp:
        request, result = Path(tmp) / "request", Path(tmp) / "result"
        req.save(request)
        argv = [str(request), str(result)]
        code = forkserver.run_forked(python, req.backend_name, argv) if forkserver.use_fork_server() else None
        if code is None:  # a fresh interpreter: no fork server here, or it could not run the side
            env = forkserver.child_env(forkserver.package_path_dir(Path(tmp)))
            code = subprocess.run([python, "-m", forkserver.SIDE_MODULE, *argv], env=env,
                                  stdin=subprocess.DEVNULL).returncode
        err = result / ERROR_FILE
        if code != 0:
            if err.is_file():
                raise LoraParityError(err.read_text().strip())
            raise LoraParityError(f"the {_label(req)} side stopped with exit code {code} "
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


