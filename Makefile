# One entry point for people and CI. `make demo` and `make test` create the
# virtual environment themselves; the torch pin lives in constraints.txt only.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint bench reproduce clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[test,triton]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/adafactor demo

reproduce: $(VENV)/.installed
	$(VENV)/bin/adafactor reproduce --quick

bench: $(VENV)/.installed
	$(VENV)/bin/adafactor bench

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

# Multi-process (gloo) tests run on their own, so their ranks do not compete with xdist workers.
test: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m pytest -q -n 2 -m "not distributed" tests
	$(PY) -m pytest -q -m distributed tests/distributed

clean:
	rm -rf $(VENV) build dist src/*.egg-info
