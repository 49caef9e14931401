# Loom's two set-up commands (both work on a fresh machine):
#   make demo   create .venv, install, build the bundled corpus + tokenizer, train the debug recipe end to end
#   make test   create .venv, install with test extras, run ruff and the whole test suite
# An existing torch in the venv (e.g. a CUDA build on a GPU machine) is reused, never replaced; only when torch
# is missing is the CPU build pinned (torch==2.13.0 from PyTorch's CPU index, so no multi-GB CUDA download).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU := torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
RECIPE ?= recipes/debug.yaml

.PHONY: demo test install install-dev data lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Marker files make re-runs cheap; they depend on pyproject.toml so a changed dependency list reinstalls.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_CPU)" --extra-index-url "$(TORCH_CPU_INDEX)"
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

data: install
	$(VENV)/bin/loom data demo --out data/demo

demo: data
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VENV)/bin/loom train $(RECIPE)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
