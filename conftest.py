"""Suite-wide options, markers and Hypothesis profiles.

Markers are declared in pytest.ini (``--strict-markers``); options here let the
same tests run on a user's real checkpoint (``--lora-ckpt``) or a real base
model, and let CI override thresholds from the one tolerance table.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("lora-parity")
    g.addoption("--lora-ckpt", action="store", default=None, metavar="PATH",
                help="a real MindONE LoRA .ckpt: the conversion layer also runs on it (no NPU needed)")
    g.addoption("--sdxl-base", action="store", default=None, metavar="SPEC",
                help="the SDXL base for the ascend layer: a diffusers folder, an official single-file checkpoint "
                     "or random:sdxl-base (as compare --base)")
    g.addoption("--ms-device", action="store", default=None, choices=("Ascend", "CPU", "GPU"),
                help="device for the MindSpore side of the ascend layer (default: Ascend)")
    g.addoption("--ms-backend", action="store", default="all", choices=("all", "port", "mindone"),
                help="which MindSpore implementation the parity/image layers judge: port (this project's SGM port), "
                     "mindone (mindone.diffusers, in its own environment) or all (default)")
    g.addoption("--fullsize-cache", action="store", default=None, metavar="DIR",
                help="where the fullsize layer generates its random SDXL bases (default: ~/.cache/lora-parity)")
    for dt in ("f32", "f16", "bf16"):  # as compare's flags; lora_parity.tolerances documents what they replace
        g.addoption(f"--tol-{dt}", type=float, default=None,
                    help=f"override the {dt} per-layer bound on max|a-b|/max|ref|")
        g.addoption(f"--mismatch-{dt}", type=float, default=None,
                    help=f"override the {dt} per-layer bound on the mismatched-element fraction")
    g.addoption("--image-mae", type=float, default=None, help="override the full-image MAE bound (0-255)")
    g.addoption("--image-max-error", type=int, default=None, help="override the full-image max-error bound (0-255)")


def gate_overrides(config) -> dict:
    """The CompareOptions fields the threshold options set (None: the table's value)."""
    tol = {dt.upper(): config.getoption(f"--tol-{dt}") for dt in ("f32", "f16", "bf16")}
    mismatch = {dt.upper(): config.getoption(f"--mismatch-{dt}") for dt in ("f32", "f16", "bf16")}
    return {"tol_overrides": tol, "mismatch_overrides": mismatch, "image_mae": config.getoption("--image-mae"),
            "image_max_error": config.getoption("--image-max-error")}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark)
