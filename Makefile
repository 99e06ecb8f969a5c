# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch and torchvision are pinned here (the install path CI and the README use);
# the package itself only asks for torch>=2.1.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
EXTRAS := test,examples,docs,bench,dev

.PHONY: demo test test-quick lint docs bench gpu-check clean

# __init__.py holds the version the metadata is built from: a bump reinstalls.
$(STAMP): pyproject.toml Makefile src/dilconv/__init__.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet $(TORCH_PINS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -n 2 --durations=15

test-quick: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks

docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W -b html docs docs/_build/html

bench: $(STAMP)
	$(PY) -m benchmarks.run --json runs/bench.json --markdown runs/bench.md

# Everything that needs a GPU, in one go (benchmarks/gpu_check.py). Not through $(STAMP): a GPU
# machine may have no package index; the check names what is missing and installs nothing.
GPU_PYTHON ?= $(shell test -x $(PY) && echo $(PY) || echo $(PYTHON))
gpu-check:
	PYTHONPATH=src $(GPU_PYTHON) -m benchmarks.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) docs/_build runs .pytest_cache .hypothesis
