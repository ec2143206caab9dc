# One entry point for people and CI. `make demo` and `make test` create the
# virtual environment themselves; the torch pin lives in constraints.txt only.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint bench reproduce clean gpu-check

# Two stamps: the commands (demo, reproduce, bench) need only the [cli] extra (tqdm,
# matplotlib); test and lint also get the test tools and triton (about 1 GB), which a CPU-only
# demo never uses. Each installs torch first, so that the pin picks the wheel.
$(VENV)/.installed-cli: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[cli]'
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[test,triton,integrations]'
	touch $@

demo: $(VENV)/.installed-cli
	$(VENV)/bin/adafactor demo

reproduce: $(VENV)/.installed-cli
	$(VENV)/bin/adafactor reproduce --quick

bench: $(VENV)/.installed-cli
	$(VENV)/bin/adafactor bench

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

# Multi-process (gloo) tests run on their own, so their ranks do not compete with xdist workers.
test: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m pytest -q -n 2 -m "not distributed" tests
	$(PY) -m pytest -q -m distributed tests/distributed tests/test_release.py

# The GPU check (docs/gpu.md): parity, no-sync, CUDA-graph and determinism tests on the device and
# the GPU benchmark against a measured bandwidth roofline; about 5 minutes, at most 8. Without a
# CUDA device it says so and exits 0. Results in build/gpu-check (or $GPU_CHECK_OUT / $OUT).
gpu-check:
	scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build dist src/*.egg-info
