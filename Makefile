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
# The pure-Python Transformer Engine wheel whose sources the TE contract test reads (1.2 MB; no CUDA needed).
TE_VERSION := 2.20.2
TE_CACHE ?= $(HOME)/.cache/loom/te
TE_WHEEL := $(TE_CACHE)/transformer_engine-$(TE_VERSION)-py3-none-any.whl

.PHONY: demo test install install-dev torch-cpu data lint clean gpu-prepare

$(PY):
	$(PYTHON) -m venv $(VENV)

# Marker files make re-runs cheap; they depend on pyproject.toml so a changed dependency list reinstalls.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(MAKE) --no-print-directory torch-cpu
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -e ".[dev]"
	touch $@

# torch alone from the CPU index (--no-deps: only this one package is looked up there, so an index this machine
# cannot reach costs one bounded retry, not one retry storm per dependency), then its deps from the default index.
torch-cpu: | $(PY)
	$(PIP) install --quiet --no-deps --retries 1 --timeout 15 "$(TORCH_CPU)" --extra-index-url "$(TORCH_CPU_INDEX)"
	$(PIP) install --quiet "$(TORCH_CPU)"

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

data: install
	$(VENV)/bin/loom data demo --out data/demo

demo: data
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VENV)/bin/loom train $(RECIPE)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# A failed fetch does not stop `make test`: the contract test then fails, naming this step (never a skip).
$(TE_WHEEL): | $(PY)
	-$(PIP) download --quiet --no-deps --retries 2 --timeout 30 "transformer-engine==$(TE_VERSION)" -d "$(TE_CACHE)"

test: lint $(TE_WHEEL)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} LOOM_TE_SOURCES="$(TE_WHEEL)" $(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

# What a lent GPU machine (no internet) needs carried: wheels, data/demo, the seq-4096 data (docs/gpu.md).
gpu-prepare: install-dev
	PYTHON=$(PY) tools/gpu_prepare

clean:
	rm -rf runs .pytest_cache .ruff_cache
