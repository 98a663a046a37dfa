#!/usr/bin/env bash
# install.sh VENV PIP-INSTALL-ARGS...: `pip install ARGS` into VENV, done by uv when it can be had.
#
# Why: setup is the one serial part of `make test` before the tests can use both cores. pip unpacks and
# byte-compiles on one core (the .venv alone measured 79.5 s, the two venvs side by side 111 s wall); uv
# resolves the same pins from the same sources and unpacks in parallel (29 s and 24 s measured with
# byte-compiling everything, the same `pip freeze`). Nothing is byte-compiled here: scripts/warm_bytecode.py
# writes the bytecode of what is imported (most of what is installed never is). uv does not read pip's
# configuration, so pip's find-links, index and extra indexes (here: the local torch CPU wheel and package
# mirrors) are handed to it, with pip's rule of taking the best version from all of them. Without uv (not
# installable), plain pip does the install, as before.
set -euo pipefail
UV_PIN="uv==0.13.9"  # the uv every measured setup used
venv=$1
shift
py="$venv/bin/python"

pip_cfg() {  # a pip setting from its config files or PIP_* environment ("" if none)
    "$py" -m pip config get "$1" 2>/dev/null || true
}

if [ ! -x "$venv/bin/uv" ]; then
    "$py" -m pip install -q "$UV_PIN" >/dev/null 2>&1 || true
fi
if [ ! -x "$venv/bin/uv" ]; then
    echo "install.sh: uv not available, installing with pip" >&2
    "$py" -m pip install -q --upgrade pip
    exec "$py" -m pip install -q --no-compile "$@"
fi

args=(--python "$py" --index-strategy unsafe-best-match)
for link in ${PIP_FIND_LINKS:-} $(pip_cfg global.find-links); do args+=(--find-links "$link"); done
index=${PIP_INDEX_URL:-$(pip_cfg global.index-url)}
if [ -n "$index" ]; then args+=(--default-index "$index"); fi
for url in ${PIP_EXTRA_INDEX_URL:-} $(pip_cfg global.extra-index-url); do args+=(--extra-index-url "$url"); done
exec "$venv/bin/uv" pip install -q "${args[@]}" "$@"
