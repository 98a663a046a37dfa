"""The lora-parity pytest plugin: options, markers, Hypothesis profiles and option fixtures.

Installed with the package as the ``pytest11`` entry point ``lora_parity``, so the options exist
before pytest reads the command line: ``--lora-ckpt /data/my_lora.ckpt`` (space-separated) works
from any folder, and ``pytest --pyargs lora_parity -m conversion --lora-ckpt PATH`` runs the
shipped suite (:mod:`lora_parity.suite`) on the user's file.  The repository's ``conftest.py``
registers this module itself when the entry point is not loaded (no ``pip install``,
``PYTEST_DISABLE_PLUGIN_AUTOLOAD``).

Everything happens in hooks; an installed plugin is loaded into every pytest run of its
environment, so nothing here changes other projects' runs: markers and options are only added,
the Hypothesis profile is loaded only where the ini file sets ``lora_parity_dev_suite = true``
(this repository's ``pytest.ini``), and the benchmark marker is only added there too; so is
``LORA_PARITY_NO_SKIPS`` (CI: a skip not in :data:`ALLOWED_SKIPS` fails).
"""
from __future__ import annotations

import copy
import functools
import inspect
import json
import os
from pathlib import Path
import re

import pytest

NAME = "lora_parity"  # the entry point's name: ``-p no:lora_parity`` turns it off

MARKERS = {
    "conversion": "key-map completeness and bitwise round trips (seconds, no forward passes)",
    "parity": "per-layer UNet / text-encoder / VAE activations, MindSpore vs PyTorch",
    "image": "full-image metrics (MAE on 0-255, PSNR, SSIM)",
    "ascend": "real MindSpore on an Ascend NPU (skipped without one; --ms-device CPU runs it here)",
    "fullsize": "real-size SDXL base and refiner (random weights, generated once into the cache) through compare",
    "benchmark": "speed measurements with pytest-benchmark (run with `make bench`)",
    "suite": "the shipped suite run as users run it (pytest in a subprocess, from outside the repository)",
}

#: options whose value is a path: given as ``--opt VALUE``, pytest locates its configuration
#: before this plugin is loaded, taking VALUE for a test path (see :func:`_relocate_config`)
PATH_OPTIONS = ("--lora-ckpt", "--base", "--sdxl-base", "--fullsize-cache", "--lora-layout")

DEV_SUITE_INI = "lora_parity_dev_suite"
PROFILES = {"dev": dict(max_examples=25, deadline=None),
            "ci": dict(max_examples=40, deadline=None, derandomize=True, print_blob=True)}

#: CI sets it (``.ci/run``): in this repository's test tree (``lora_parity_dev_suite = true``) a test skipped
#: for any reason not in :data:`ALLOWED_SKIPS` -- a framework, backend or environment missing -- fails instead
#: (replaces ``LORA_PARITY_REQUIRE_MINDONE``, which did this for the mindone backend alone)
NO_SKIPS_ENV = "LORA_PARITY_NO_SKIPS"

#: The skips a CI run may keep, and why: ``(pattern searched in the skip reason, why the skip is legitimate)``.
#: tests/test_no_skips.py checks that each pattern matches the message its condition really produces.
ALLOWED_SKIPS: tuple[tuple[str, str], ...] = (
    (r"no Ascend NPU", "the ascend layer needs an Ascend NPU; CI machines have none (its tests also run on CPU "
                       "through tests/test_ascend_layer_runs.py)"),
    (r"on CPU has no BF16 MatMul kernel", "MindSpore's CPU build has no bf16 MatMul kernel: bf16 runs need an NPU"),
    (r"^no --lora-ckpt PATH given", "the real-checkpoint layer checks the user's own LoRA; CI has none"),
)

_SUMMARY = pytest.StashKey[list]()
_LORA = pytest.StashKey[Path]()
_ONLY_SUITE = pytest.StashKey[bool]()


# ---------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("lora-parity")
    g.addoption("--lora-ckpt", action="store", default=None, metavar="PATH",
                help="your MindONE LoRA .ckpt (or a PEFT / kohya file): the shipped suite (pytest --pyargs "
                     "lora_parity) checks it without base weights or an NPU; with --base also the "
                     "parity and image layers")
    g.addoption("--lora-layout", action="store", default=None, metavar="SPEC",
                help="the LoRA's model layout for --lora-ckpt: sdxl-base, sdxl-refiner, sd15, sd21, sd3, flux, tiny, "
                     "tiny-sd3, tiny-flux, a diffusers unet / transformer config.json or pipeline folder (default: "
                     "detected from names and shapes, and the family recorded)")
    g.addoption("--lora-alpha", action="store", type=float, default=None, metavar="A",
                help="the lora_alpha --lora-ckpt was trained with (a MindONE .ckpt stores none; default: rank)")
    g.addoption("--lora-scale", action="store", type=float, default=None, metavar="S",
                help="a MindONE SD 1.x / 2.x LoRA (lora_down / lora_up .ckpt): the --lora_scale it runs with "
                     "(alpha = S x rank; default 1)")
    g.addoption("--lora-ema", action="store", default=None, choices=("ema", "trained"),
                help="a MindONE file holding both LoRA sets: check the EMA copies or the trained ones")
    g.addoption("--base", "--sdxl-base", dest="base", action="store", default=None, metavar="SPEC",
                help="the base model for the ascend layer and, with --lora-ckpt, the shipped parity/image test: a "
                     "diffusers folder (SDXL, SD 1.x / 2.x, SD3, Flux), an official single-file checkpoint or "
                     "random:NAME (random:sdxl-base, random:sd15, random:sd3, random:flux, random:tiny-flux, ...: "
                     "as compare --base); --sdxl-base is the older name")
    g.addoption("--parity-size", action="store", type=int, default=None, metavar="PX",
                help="image size for the --lora-ckpt + --sdxl-base parity test (default: compare's, 1024 at "
                     "real size; 256 is enough on a CPU)")
    g.addoption("--ms-device", action="store", default=None, choices=("Ascend", "CPU", "GPU"),
                help="device for the MindSpore side of the ascend layer (default: Ascend)")
    g.addoption("--ms-backend", action="store", default="all", choices=("all", "port", "mindone"),
                help="which MindSpore implementation the parity/image layers judge: port (this project's SGM port), "
                     "mindone (mindone.diffusers, in its own environment) or all (default)")
    g.addoption("--fullsize-cache", action="store", default=None, metavar="DIR",
                help="where the fullsize layer generates its random SDXL bases (default: ~/.cache/lora-parity)")
    for dt in ("f32", "f16", "bf16"):  # as compare's flags; lora_parity.parity.tolerances documents what they replace
        g.addoption(f"--tol-{dt}", type=float, default=None,
                    help=f"override the {dt} per-layer bound on max|a-b|/max|ref|")
        g.addoption(f"--mismatch-{dt}", type=float, default=None,
                    help=f"override the {dt} per-layer bound on the mismatched-element fraction")
        g.addoption(f"--rms-{dt}", type=float, default=None,
                    help=f"override the {dt} per-layer bound on ||a-b||/||ref|| (the local rows')")
    g.addoption("--image-mae", type=float, default=None, help="override the full-image MAE bound (0-255)")
    g.addoption("--image-max-error", type=int, default=None, help="override the full-image max-error bound (0-255)")
    parser.addini(DEV_SUITE_INI, type="bool", default=False,
                  help="lora-parity's own test tree: load its Hypothesis profile (HYPOTHESIS_PROFILE=dev|ci, "
                       "default dev, ci when CI is set) and mark tests using the benchmark fixture `benchmark`")


def gate_overrides(config) -> dict:
    """The CompareOptions fields the threshold options set (None: the table's value)."""
    tol = {dt.upper(): config.getoption(f"--tol-{dt}") for dt in ("f32", "f16", "bf16")}
    mismatch = {dt.upper(): config.getoption(f"--mismatch-{dt}") for dt in ("f32", "f16", "bf16")}
    rms = {dt.upper(): config.getoption(f"--rms-{dt}") for dt in ("f32", "f16", "bf16")}
    return {"tol_overrides": tol, "mismatch_overrides": mismatch, "rms_overrides": rms,
            "image_mae": config.getoption("--image-mae"),
            "image_max_error": config.getoption("--image-max-error")}


# ---------------------------------------------------------------- where pytest looks for its configuration


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    _relocate_config(early_config, parser, args)


def _spaced_path_options(args: list[str]) -> list[tuple[str, str]]:
    """(option, value) for each of our path options given as two words."""
    return [(a, args[i + 1]) for i, a in enumerate(args[:-1]) if a in PATH_OPTIONS]


def _relocate_config(config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """Locate rootdir and ini file again now that our options are known.

    pytest finds its rootdir and ini file before it loads plugins: in
    ``pytest -m conversion --lora-ckpt /data/loras/my_lora.ckpt`` it takes the value for a test
    path, so the rootdir becomes ``/data/loras``, the project's ``pytest.ini`` (markers, addopts,
    testpaths) is never read and only ``--lora-ckpt=PATH`` worked.  Here the same search runs
    again with the arguments parsed as they are meant; if it lands elsewhere, the configuration
    it finds replaces the one found from the value.  This reaches into pytest's config object
    (checked with pytest 8.x-9.x); where that is not possible, one usage error says to write
    ``--opt=PATH``.
    """
    spaced = _spaced_path_options(args)
    if not spaced:
        return
    ns = config.known_args_namespace
    try:
        from _pytest.config.findpaths import determine_setup

        kwargs = dict(inifile=ns.inifilename, args=list(ns.file_or_dir), rootdir_cmd_arg=ns.rootdir or None,
                      invocation_dir=config.invocation_params.dir)
        if "override_ini" in inspect.signature(determine_setup).parameters:
            kwargs["override_ini"] = ns.override_ini
        found = determine_setup(**kwargs)
        rootpath, inipath, inicfg = found[0], found[1], found[2]
        if (rootpath, inipath) == (config.rootpath, config.inipath):
            return
        old_addopts = list(config.getini("addopts"))
        old_confcutdir = str(config.inipath.parent if config.inipath is not None else config.rootpath)
        config._rootpath, config._inipath, config._inicfg = rootpath, inipath, inicfg
        if len(found) > 3 and hasattr(config, "_ignored_config_files"):
            config._ignored_config_files = found[3]
        config._inicache.clear()
    except Exception as exc:  # noqa: BLE001 - pytest internals differ: say what works instead
        opt, value = spaced[0]
        raise pytest.UsageError(
            f"{opt} {value}: pytest took the path for a test path when it located its configuration "
            f"(and this pytest version cannot be corrected: {type(exc).__name__}); write {opt}={value}") from None
    parser.extra_info["rootdir"] = str(rootpath)
    parser.extra_info["inifile"] = str(inipath)
    if old_addopts and args[:len(old_addopts)] == old_addopts:  # those of the ini found from the value
        del args[:len(old_addopts)]
    args[:0] = list(config.getini("addopts"))
    config.known_args_namespace = parser.parse_known_args(args, namespace=copy.copy(config.option))
    if ns.confcutdir is not None and str(ns.confcutdir) != old_confcutdir:
        config.known_args_namespace.confcutdir = ns.confcutdir  # given on the command line
    else:
        config.known_args_namespace.confcutdir = str(inipath.parent if inipath is not None else rootpath)


# ---------------------------------------------------------------- configure


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    config.stash[_SUMMARY] = []
    _share_cores_between_workers()
    if config.getini(DEV_SUITE_INI):
        _load_hypothesis_profile(config)
    if config.getini(DEV_SUITE_INI) or config.getoption("--lora-ckpt", None):
        _skip_collecting_at_exit()
        _collect_less_often(config)
    if config.getoption("help", False) or config.getoption("version", False):
        return
    _check_options(config)


_EXIT_FREEZE_REGISTERED = False


def _skip_collecting_at_exit() -> None:
    """At interpreter exit, move every object to the permanent generation before Python tears down.

    Why: a process that imported torch + diffusers spends 1.5-2 s after its last line, in the cyclic
    garbage collections of finalization over ~3,600 modules' objects (measured: import of diffusers' UNet
    module then exit 7.7-8.6 s; with ``gc.freeze()`` at exit 6.5-6.7 s; ``os._exit`` 5.8-7.1 s).  That is
    a fifth of ``pytest -m conversion`` on the user's own LoRA and is paid again by each xdist worker.
    Nothing a run reports is left out: pytest has written its results and every other exit handler
    (temporary folders, fork servers) still runs, objects are still freed by reference counting; only the
    final cycle hunts are skipped.  Registered as an exit handler, not called now, so a caller of
    ``pytest.main`` in a long-lived process keeps its collector until that process ends."""
    global _EXIT_FREEZE_REGISTERED
    if not _EXIT_FREEZE_REGISTERED:
        import atexit
        import gc

        atexit.register(gc.freeze)
        _EXIT_FREEZE_REGISTERED = True


def _collect_less_often(config: pytest.Config) -> None:
    """Rarer young-generation garbage collections (``sides.memory.collect_less_often``: every 50,000 net
    allocations instead of 700) for the whole run.

    Why: each worker imports torch, transformers and diffusers and builds real-size module trees, and the
    shipped layer has PEFT inject two adapters into a real-size pipeline: ``pytest --pyargs lora_parity -m
    conversion --lora-ckpt`` on a real-size SDXL LoRA measured 9.9-10.2 s with the default against 8.9-9.4 s
    (three alternating runs each), max RSS 1.07 GB either way.  Only this suite's runs and ``--lora-ckpt`` runs;
    the thresholds found are put back when pytest unconfigures, for a caller of ``pytest.main`` in a long-lived
    process."""
    import gc

    from lora_parity.sides.memory import collect_less_often

    config.add_cleanup(functools.partial(gc.set_threshold, *collect_less_often()))


def _share_cores_between_workers() -> None:
    """In a pytest-xdist worker, give each worker its own share of the cores (what the user set wins).

    Every worker starts its own sides, and torch / MindSpore would each spread over all cores: with 2 workers
    on 2 cores, measured 114 s for ten compares in two processes against 77 s with one thread each.  The cap
    alone is not enough for MindSpore: whatever its thread count, its actor and kernel threads busy-wait
    (``sched_yield``) between PyNative ops, about 0.8 of a core each (measured, per-thread CPU time), so every
    MindSpore side took both cores from both workers.  Each worker (and every process it starts) is therefore
    also bound to its own cores (``sched_setaffinity``), where the waiting threads only take the time their
    own process leaves: a full-size VAE decode measured 7.2 s on 2 cores using 1.8 of them, 9.5 s bound to one."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers < 2:
        return
    from lora_parity.sides.threads import THREADS_ENV, cores

    user_set = bool(os.environ.get(THREADS_ENV))
    share = max(1, cores() // workers)
    os.environ.setdefault(THREADS_ENV, str(share))  # the sides (lora_parity.sides.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(share))  # frameworks the tests run in this process
    if not user_set:
        _bind_worker(workers)


def _bind_worker(workers: int) -> None:
    """Bind this xdist worker (``gwN``) to every ``workers``-th core of its allowed set from the N-th on (so no
    core is left out), when there are enough cores for every worker to have its own (else nothing: sharing
    cores is then unavoidable)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    if len(allowed) < workers or not name.startswith("gw") or not name[2:].isdigit():
        return
    index = int(name[2:])
    if index >= workers:
        return
    os.sched_setaffinity(0, allowed[index::workers])


def _load_hypothesis_profile(config: pytest.Config) -> None:
    """The repository's profiles ``dev`` and ``ci``; Hypothesis' own ``--hypothesis-profile`` wins."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:
        return
    for name, kwargs in PROFILES.items():
        extra = {"suppress_health_check": [HealthCheck.too_slow]} if name == "ci" else {}
        settings.register_profile(name, **kwargs, **extra)
    if config.getoption("hypothesis_profile", None):
        return
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
    try:
        settings.load_profile(name)
    except Exception:  # noqa: BLE001 - hypothesis.errors.InvalidArgument
        raise pytest.UsageError(f"HYPOTHESIS_PROFILE={name}: no such Hypothesis profile "
                                f"(this suite has {', '.join(PROFILES)})") from None


def _check_options(config: pytest.Config) -> None:
    """A missing or unreadable ``--lora-ckpt`` (and other bad values) is one usage error, before collection."""
    value = config.getoption("--lora-ckpt")
    if value is not None:
        path = Path(value).expanduser()
        if not path.exists():
            raise pytest.UsageError(f"--lora-ckpt {value}: no such file")
        if not path.is_file():
            raise pytest.UsageError(f"--lora-ckpt {value}: not a file")
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise pytest.UsageError(f"--lora-ckpt {value}: cannot be read ({exc.strerror or exc})") from None
        config.stash[_LORA] = path.resolve()
    for opt in ("--lora-alpha", "--lora-scale"):
        value = config.getoption(opt)
        if value is not None and not (value > 0 and value != float("inf")):
            raise pytest.UsageError(f"{opt} {value}: must be a positive number")
    if config.getoption("--lora-alpha") is not None and config.getoption("--lora-scale") is not None:
        raise pytest.UsageError("--lora-alpha and --lora-scale both set the LoRA's scale; give one")
    layout = config.getoption("--lora-layout")
    if layout is not None:
        from lora_parity.errors import LoraParityError
        from lora_parity.convert.layout import load_layout

        try:
            load_layout(os.path.expanduser(layout))
        except LoraParityError as exc:
            raise pytest.UsageError(f"--lora-layout {layout}: {exc}") from None
    size = config.getoption("--parity-size")
    if size is not None and (size <= 0 or size % 8):
        raise pytest.UsageError(f"--parity-size {size}: must be a positive multiple of 8")


# ---------------------------------------------------------------- collection


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Inside the installed package only the shipped suite is collected (``--pyargs lora_parity``),
    whatever ``python_files`` says: the library's modules are never imported as test modules."""
    if config.getoption("doctestmodules", False):
        return None
    package = Path(__file__).resolve().parents[1]
    suite = Path(__file__).resolve().parent
    try:
        path = collection_path.resolve()
    except OSError:
        return None
    if path == package or not path.is_relative_to(package) or path.is_relative_to(suite):
        return _no_selected_marker(path, config)
    return True


_MARK = re.compile(r"\bpytest\.mark\.(\w+)")


def _no_selected_marker(path: Path, config: pytest.Config) -> bool | None:
    """``True`` for a test file none of whose tests can match a positive ``-m`` expression.

    ``pytest -m conversion`` is the layer users run first: importing a module that only holds
    parity or benchmark tests (and imports torch, diffusers and mindspore to do so) costs
    seconds each, for tests that are then deselected.  The markers a test can carry are a
    subset of those the file names (``pytest.mark.X``; ``benchmark`` for users of the fixture),
    so if the expression is false even with all of them, no test there is selected.  With a
    ``not`` the upper bound says nothing, and the file is collected as usual.
    """
    expr = (config.getoption("markexpr", "") or "").strip()
    if not expr or re.search(r"\bnot\b", expr) or path.suffix != ".py" or not path.name.startswith("test_"):
        return None
    try:
        from _pytest.mark.expression import Expression

        text = path.read_text(encoding="utf-8")
        names = set(_MARK.findall(text)) | ({"benchmark"} if "benchmark" in text else set())
        return True if not Expression.compile(expr).evaluate(lambda name, **_: name in names) else None
    except Exception:  # noqa: BLE001 - private API or unreadable file: collect as usual
        return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    suite = Path(__file__).resolve().parent
    config.stash[_ONLY_SUITE] = bool(items) and all(Path(str(i.path)).resolve().is_relative_to(suite) for i in items)
    if not config.getini(DEV_SUITE_INI):
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items[:] = xdist_order(items, _file_seconds(config.rootpath / FILE_SECONDS))
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark)
        # the layer each test's time counts against (scripts/suite_times.py reads it from the JUnit file)
        item.user_properties.append(("layer", layer_of(item)))


#: each test file's measured seconds (``scripts/suite_times.py --file-seconds``, from a make test JUnit file)
FILE_SECONDS = "tests/file_seconds.json"


def _file_seconds(path: Path) -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def xdist_order(items: list[pytest.Item], seconds: dict[str, float] | None = None) -> list[pytest.Item]:
    """The order pytest-xdist hands test files to workers (the repository's pytest.ini runs every
    pytest with ``--dist loadfile --no-loadscope-reorder``): the ``fullsize`` files first, then the longest
    files first by their measured ``seconds`` (a file not measured yet: one second per test), each file's
    tests in their own order.

    Why: the full-size layer is one file of ~12 minutes on one worker; started first, it runs beside the small
    tests on the other worker instead of after them (each worker has a core of its own, so the two never
    compete for one).  Longest first leaves the shortest files for the end, where one worker may wait: xdist
    gives a worker its next file once at most two of its tests are pending, so a file can sit behind the last
    full-size faults while the other worker runs out.  Every worker collects the same items, so every worker
    computes the same order."""
    seconds = seconds or {}
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)

    def longest_first(entry):
        path, tests = entry
        return (not any(t.get_closest_marker("fullsize") for t in tests), -seconds.get(path, float(len(tests))))

    return [item for _, tests in sorted(files.items(), key=longest_first) for item in tests]


#: the order in which a test with several layer markers is counted (the heaviest first)
LAYER_ORDER = ("fullsize", "ascend", "benchmark", "suite", "image", "parity", "conversion")


def layer_of(item: pytest.Item) -> str:
    """The suite layer a test belongs to (its heaviest layer marker), or "other"."""
    names = {m.name for m in item.iter_markers()}
    return next((layer for layer in LAYER_ORDER if layer in names), "other")


# ---------------------------------------------------------------- skips under LORA_PARITY_NO_SKIPS


def allowed_skip(reason: str) -> str | None:
    """Why a skip with this reason is allowed under ``LORA_PARITY_NO_SKIPS`` (None: it is not)."""
    return next((why for pattern, why in ALLOWED_SKIPS if re.search(pattern, reason)), None)


def _no_skips(config: pytest.Config) -> bool:
    """Enforced in this repository's own test tree only: the shipped suite that tests run in a subprocess
    from another folder skips by design (a check after a failed one is skipped naming it)."""
    return bool(os.environ.get(NO_SKIPS_ENV)) and bool(config.getini(DEV_SUITE_INI))


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


def _fail_unlisted_skip(report, config: pytest.Config) -> None:
    """Turn ``report`` (a skip whose reason is not in :data:`ALLOWED_SKIPS`) into a failure naming the reason."""
    if not report.skipped or hasattr(report, "wasxfail") or not _no_skips(config):
        return
    reason = _skip_reason(report)
    if allowed_skip(reason) is not None:
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under {NO_SKIPS_ENV}=1 without an allowed reason: {reason}\n"
                       f"(a framework, backend or environment this run must have is missing; the allowed skips "
                       f"are listed in lora_parity.suite.plugin.ALLOWED_SKIPS)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    _fail_unlisted_skip(report, item.config)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A whole module skipped at import (``pytest.importorskip`` at module level) is judged the same way."""
    report = yield
    _fail_unlisted_skip(report, collector.config)
    return report


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def lora_ckpt_option(request) -> Path | None:
    """``--lora-ckpt PATH`` as an absolute path (checked to be a readable file), or None."""
    return request.config.stash.get(_LORA, None)


@pytest.fixture(scope="session")
def base_option(request) -> str | None:
    """``--base SPEC`` (or its older name ``--sdxl-base``): a folder, a single-file checkpoint or random:NAME."""
    return request.config.getoption("base")


@pytest.fixture(scope="session")
def sdxl_base_option(base_option) -> str | None:
    """The older name of :func:`base_option`."""
    return base_option


@pytest.fixture(scope="session")
def lora_summary(request) -> list[str]:
    """Lines the shipped suite prints after the run, in a ``lora-parity`` section."""
    return request.config.stash[_SUMMARY]


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    lines = config.stash.get(_SUMMARY, None)
    if (config.stash.get(_ONLY_SUITE, False) and config.getoption("--lora-ckpt") is None
            and not config.getoption("collectonly", False)):
        terminalreporter.write_sep("=", "lora-parity")
        terminalreporter.write_line("the shipped suite checks your own LoRA: add --lora-ckpt PATH (and --base SPEC "
                                    "for the parity and image layers); -rs lists why each test was skipped")
    if not lines:
        return
    path = config.stash.get(_LORA, None)
    terminalreporter.write_sep("=", f"lora-parity: {path}" if path else "lora-parity")
    for line in lines:
        terminalreporter.write_line(line)
