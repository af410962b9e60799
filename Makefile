# Set-up and checks for imgdiff. Everything runs in a local virtual environment (.venv) that the
# first target creates; nothing is installed system-wide.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo quickstart test lint typecheck check bench clean

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
	rm -rf $(VENV) outputs .pytest_cache .mypy_cache .ruff_cache .hypothesis
