# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
# the `mindone` backend's own environment: mindone 0.5.0 needs transformers 4.57 / huggingface-hub < 1,
# diffusers 0.42 needs huggingface-hub >= 1.32 (README "Environments")
MINDONE_VENV := .venv-mindone
MINDONE_STAMP := $(MINDONE_VENV)/.setup-done
# what mindone.diffusers' SDXL path imports; mindone's other requirements (opencv-python, mindcv, nltk,
# better-profanity, sentencepiece) serve other models and are not installed (mindone itself: --no-deps)
MINDONE_RUNTIME := mindspore transformers huggingface-hub tokenizers safetensors numpy omegaconf trampoline PyYAML tqdm

.PHONY: setup demo test test-conversion bench mutants clean

# the two environments are independent: built side by side. scripts/install.sh installs with uv (pip's sources
# and pins, parallel unpacking; pip when uv cannot be had): measured 111 s -> 61 s wall with everything
# byte-compiled. Bytecode matters: with PYTHONDONTWRITEBYTECODE set (it is on this machine) a module without a
# .pyc is compiled from source by every process (measured: the parallel part 513 s -> 686 s), but most of what is
# installed is never imported, so scripts/warm_bytecode.py writes the .pyc of what is (the backends' imports, this
# package, the test tools), and the test runs below write any other on first import (bytecode writing on there).
INSTALL := bash scripts/install.sh
setup:
	@$(MAKE) --no-print-directory -j2 $(STAMP) $(MINDONE_STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(INSTALL) $(VENV) -c constraints.txt -e '.[test]'
	$(PY) scripts/warm_bytecode.py diffusers port --tests
	touch $(STAMP)

$(MINDONE_STAMP): pyproject.toml constraints-mindone.txt
	test -x $(MINDONE_VENV)/bin/python || $(PYTHON) -m venv $(MINDONE_VENV)
	$(INSTALL) $(MINDONE_VENV) -c constraints-mindone.txt $(MINDONE_RUNTIME)
	$(INSTALL) $(MINDONE_VENV) --no-deps -c constraints-mindone.txt mindone
	$(INSTALL) $(MINDONE_VENV) --no-deps -e .
	$(MINDONE_VENV)/bin/python scripts/warm_bytecode.py mindone
	touch $(MINDONE_STAMP)

demo: setup
	$(VENV)/bin/lora-parity demo

# One run, every layer on all cores (pytest-xdist, as pytest.ini's addopts set for every run: --dist loadfile keeps
# a test file on one worker, so its module fixtures -- generated bases, captures, trained LoRAs -- are built once):
# each worker is bound to a core of its own (lora_parity/suite/plugin.py) and the full-size layer's file is handed
# out first, so it runs on one worker (its captures one at a time, 10-12 GB each) while the other takes the small
# tests (--no-loadscope-reorder: the plugin's order, fullsize first, then the longest files by
# tests/file_seconds.json, refreshed with scripts/suite_times.py --file-seconds). The benchmark layer runs here
# as pytest.ini has it, --benchmark-disable: each benchmark's body once, as a test (it used to run in a second,
# serial pass: 18.5 s of wall time on one core for the same 10 single runs); `make bench` times them, alone.
# The JUnit file keeps each test's layer and metrics: `make bench` / .ci/run print the time per layer from it.
JOBS ?= auto
test: setup
	mkdir -p reports
	rm -f reports/junit.xml
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -n $(JOBS) --maxprocesses 4 --junitxml=reports/junit.xml $(PYTEST_ARGS)

test-conversion: setup
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -m conversion

bench: setup
	$(PY) -m pytest -n 0 -m benchmark --benchmark-only --benchmark-enable --benchmark-columns=min,median,mean,max,rounds
	$(PY) scripts/bench_fullsize_unet.py
	@if [ -f reports/junit.xml ]; then $(PY) scripts/suite_times.py reports/junit.xml; \
	else echo "no reports/junit.xml: run make test first for the suite's time per layer"; fi

# mutation score of compare: ~40 realistic faults planted one at a time on the tiny SDXL, on both MindSpore
# backends (MUTANTS_ARGS="--backend port" for one); exits 1 when a fault is missed or crashes compare
mutants: setup
	$(PY) scripts/mutants.py $(MUTANTS_ARGS)

clean:
	rm -rf $(VENV) $(MINDONE_VENV) .pytest_cache .hypothesis .benchmarks
