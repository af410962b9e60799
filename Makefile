# Set-up and checks for imgdiff. Everything runs in a local virtual environment (.venv) that the
# first target creates; nothing is installed system-wide.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo quickstart test test-compat lint typecheck check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## The main job: train a small Palette model on toy shapes and solve its four tasks (outputs/demo/).
demo: $(STAMP)
	$(PY) -m imgdiff demo --out outputs/demo

## The ten-line quickstart (outputs/quickstart/samples.png).
quickstart: $(STAMP)
	$(PY) examples/quickstart.py --out outputs/quickstart

## Install and run the test suite (2 workers).
test: $(STAMP)
	$(PY) -m pytest -q -n 2

# The suite again in a second environment with the GPU machines' versions (Python 3.12, torch
# 2.11, Triton 3.6: .ci/gpu-image-versions.txt), on the CPU.
# (a Python 3.12 that runs: on PATH, else pyenv's; else $(PYTHON))
COMPAT_PYTHON ?= $(shell for p in python3.12 $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3; do \
	$$p -c '' >/dev/null 2>&1 && { echo $$p; exit 0; }; done; echo $(PYTHON))
COMPAT_VENV ?= .venv-compat
COMPAT_STAMP := $(COMPAT_VENV)/.installed

$(COMPAT_STAMP): pyproject.toml .ci/gpu-image-versions.txt
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install --quiet -c .ci/gpu-image-versions.txt -e ".[dev]"
	touch $(COMPAT_STAMP)

## The tests with the GPU machines' versions (a second virtual environment, .venv-compat).
test-compat: $(COMPAT_STAMP)
	$(COMPAT_VENV)/bin/python -m pytest -q -n 2

lint: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m ruff format --check src tests examples benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy

check: test lint typecheck

## Benchmarks against diffusers / DDIM (print tables; write nothing unless asked).
bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/edict.py
	$(PY) benchmarks/buffers.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) outputs .pytest_cache .mypy_cache .ruff_cache .hypothesis
