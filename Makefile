# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test test-conversion bench mutants clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lora-parity demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-conversion: setup
	$(PY) -m pytest -m conversion

bench: setup
	$(PY) -m pytest -m benchmark --benchmark-only --benchmark-enable --benchmark-columns=min,median,mean,max,rounds
	$(PY) scripts/bench_fullsize_unet.py

# mutation score of compare: ~35 realistic faults planted one at a time on the tiny SDXL (a few minutes)
mutants: setup
	$(PY) scripts/mutants.py $(MUTANTS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
