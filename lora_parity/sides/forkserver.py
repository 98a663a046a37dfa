"""Start each side process as a fork of a warm interpreter that has already imported its framework.

Why: every side runs in a process of its own (:mod:`.run` says why), and a fresh Python pays its
framework's imports before any work: torch + diffusers 3.9-4.9 s, mindone.diffusers 3.9-5.2 s, MindSpore
1.1-1.6 s (measured on this 2-core machine), against 2-13 s for a whole tiny capture.  A compare runs two
or three sides and the suite hundreds.  A fork server imports once per backend, interpreter and
environment; each side is then ``fork()`` of it: still a process of its own (its own memory, peak
resident memory, exit code, nothing left behind in the parent), with the imports already done.

What stays exactly as with a fresh process: the side's argv, working folder, environment variables,
standard output and error (the caller's current descriptors are handed over with each job, so pytest's
capture and a terminal see the same bytes), and its exit code (a signal as ``-N``, like ``subprocess``).
What differs: nothing the side computes -- the server only imports (it runs no framework op, so no
device, thread pool or random state is set up before the fork; Python's and numpy's global random
state are re-seeded in each child as a fresh process would).  The environment a framework reads at
import (``PYTHONPATH``, a ``sitecustomize``, thread counts) is part of the server's key: a side whose
environment differs gets a server of its own.

``LORA_PARITY_SIDE_START=spawn`` starts every side as a fresh interpreter instead (the old way), and a
server that cannot start or dies falls back to it, so a broken server costs time, never a result.

``python -m lora_parity.sides.forkserver FD BACKEND`` is the server: it imports what ``BACKEND``'s
capture needs, then forks one child per job read from the socket ``FD``, and exits when that closes.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

START_ENV = "LORA_PARITY_SIDE_START"
#: variables that change under a running process without changing what a side imports
VOLATILE_ENV = ("PYTEST_CURRENT_TEST",)
#: warm servers kept per process (each holds its framework's imports, 0.4-0.6 GB, mostly shared pages)
MAX_SERVERS = 4
_MAX_MESSAGE = 1 << 20
#: what each forked child runs, as ``python -m SIDE_MODULE REQUEST_DIR RESULT_DIR`` would
SIDE_MODULE = "lora_parity.sides"


def use_fork_server() -> bool:
    return (os.environ.get(START_ENV, "fork") != "spawn" and hasattr(os, "fork")
            and hasattr(socket, "send_fds") and sys.platform.startswith("linux"))


def package_path_dir(into: Path) -> Path:
    """A folder holding only a link to this ``lora_parity``: put first on a child's path, the child runs this
    very project code (also in another environment's interpreter) and nothing else of this environment."""
    path_dir = into / "path"
    path_dir.mkdir()
    (path_dir / "lora_parity").symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    return path_dir


def child_env(path_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = str(path_dir) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class ForkServer:
    """One warm server process for (interpreter, backend, environment); :meth:`run` is one side."""

    def __init__(self, python: str, backend: str, env: dict[str, str]):
        self._tmp = Path(tempfile.mkdtemp(prefix=f"lora-parity-{backend}-server-"))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [python, "-m", "lora_parity.sides.forkserver", str(theirs.fileno()), backend],
                env=child_env(package_path_dir(self._tmp), env), stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        self.sock = ours

    def run(self, argv: list[str], env: dict[str, str], module: str = "") -> int | None:
        """The side's exit code, or None when the server is gone (the caller starts the side afresh)."""
        job = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env, "module": module or SIDE_MODULE},
                         allow_nan=False).encode()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            socket.send_fds(self.sock, [job], [1, 2])
            reply = self.sock.recv(_MAX_MESSAGE)
        except OSError:
            return None
        if not reply:
            return None
        return int(json.loads(reply)["returncode"])

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        import shutil

        shutil.rmtree(self._tmp, ignore_errors=True)


_servers: "OrderedDict[tuple, ForkServer]" = OrderedDict()
_failed: set[tuple] = set()  # servers that could not start here: those sides start afresh


def _key(python: str, backend: str, env: dict[str, str]) -> tuple:
    return python, backend, tuple(sorted((k, v) for k, v in env.items() if k not in VOLATILE_ENV))


def run_forked(python: str, backend: str, argv: list[str], module: str = SIDE_MODULE) -> int | None:
    """Run ``python -m MODULE *argv`` (a side: :data:`SIDE_MODULE`) as a fork of the warm server for ``backend``;
    its exit code, or None when no server could run it (then nothing ran: start the side as a fresh process)."""
    env = dict(os.environ)
    key = _key(python, backend, env)
    if key in _failed:
        return None
    server = _servers.pop(key, None)
    if server is None or server.proc.poll() is not None:
        while len(_servers) >= MAX_SERVERS:
            _servers.popitem(last=False)[1].close()
        try:
            server = ForkServer(python, backend, env)
        except OSError:
            _failed.add(key)
            return None
    code = server.run(argv, env, module)
    if code is None:
        server.close()
        _failed.add(key)
        return None
    _servers[key] = server
    return code


@atexit.register
def close_all() -> None:
    while _servers:
        _servers.popitem()[1].close()


# --- the server side ---------------------------------------------------------------------------------------

def _serve(fd: int, backend: str) -> int:
    import gc

    sock = socket.socket(fileno=fd)
    from lora_parity.backends.registry import get_backend
    from lora_parity.sides.memory import rarer_collections

    try:
        with rarer_collections():  # the imports only: each side forked after them collects as Python does
            get_backend(backend).preload()
    except Exception:  # noqa: BLE001  the side, started afresh by the caller, reports it in its own words
        return 3
    gc.collect()
    gc.freeze()  # what the imports built stays untouched in the children: its pages stay shared
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MESSAGE, 2)
        except OSError:
            return 0
        if not msg:
            return 0
        job = json.loads(msg)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            sock.close()
            _child(job, fds)
        for f in fds:
            os.close(f)
        _, status = os.waitpid(pid, 0)
        sock.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}, allow_nan=False).encode())


def _child(job: dict, fds: list[int]) -> None:
    """Become the side process: the caller's descriptors, folder and environment, then the side's main."""
    import random
    import signal

    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for f in (devnull, *fds):
            os.close(f)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        sys.argv = [sys.argv[0], *job["argv"]]
        import runpy

        runpy.run_module(job["module"], run_name="__main__", alter_sys=True)  # as ``python -m`` runs it
        code = 0
    except SystemExit as exc:  # as the interpreter exits: an int is the code, None 0, anything else printed, 1
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # what a fresh interpreter would print for an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            import atexit as _atexit

            _atexit._run_exitfuncs()  # what the side registered (temporary folders, framework shutdown)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1]), sys.argv[2]))
