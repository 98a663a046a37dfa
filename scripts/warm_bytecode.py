"""Write the bytecode of what this project imports, once, at setup: ``python scripts/warm_bytecode.py BACKEND...``.

Why: this machine sets ``PYTHONDONTWRITEBYTECODE``, so a module whose ``.pyc`` is not written at install is
compiled from source by every process that imports it (without any: the suite's parallel part 513 s -> 686 s).
Byte-compiling everything at install did that, but most of it is never imported: of the 273 MB of sources
compiled into .venv, `make test` imported 97 MB (transformers' 400 models, diffusers' pipelines, torch's inductor
and test helpers, sympy and scipy mostly not); of .venv-mindone's 168 MB, 72 MB. Importing what runs writes just
that: each backend's warm-server imports (``Backend.preload``, what every side process starts from), this
package's own modules and, in the test environment, pytest and what the judge and reports import. What a test
imports beyond that is compiled once in `make test` (it runs with bytecode writing on).
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

sys.dont_write_bytecode = False  # this process writes .pyc files whatever the environment says

#: imported by the suite and the judge beyond the backends (the test environment only)
TEST_MODULES = ("pytest", "xdist", "hypothesis", "pytest_benchmark", "skimage.metrics", "scipy.stats",
                "matplotlib.pyplot", "matplotlib.backends.backend_agg")


def own_modules() -> list[str]:
    import lora_parity

    return [m.name for m in pkgutil.walk_packages(lora_parity.__path__, "lora_parity.")
            if not m.name.endswith("__main__")]  # those run a command when imported


def main(argv: list[str]) -> int:
    from lora_parity.backends.registry import get_backend

    tests = "--tests" in argv
    for name in [a for a in argv if not a.startswith("--")]:
        get_backend(name).preload()
    for mod in (TEST_MODULES if tests else ()) + tuple(own_modules()):
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001  a module for another environment's framework (torch / mindone): only
            pass           # its bytecode is at stake here, and that environment's own warm-up writes it
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
