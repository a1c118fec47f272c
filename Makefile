# The two set-up commands of the README: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# Caches live inside the checkout so tests control them and nothing touches $HOME.
export HF_HOME := $(CURDIR)/.cache/hf
export TORCH_HOME := $(CURDIR)/.cache/torch
export MPLCONFIGDIR := $(CURDIR)/.cache/mpl
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1
export IMPRINT_CACHE := $(CURDIR)/.cache/imprint

.PHONY: install demo test test-slow bench gpu-check gpu-check-smoke schemas clean toy-model toy-eval

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	# Registry torch wheels (CUDA-enabled, run on CPU too); never the local +cpu wheel.
	$(BIN)/pip install -q "torch>=2.14" torchvision
	$(BIN)/pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/imprint run jobs/demo.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

# Re-train the shipped toy model and toy-clip from their fixed seeds into
# pipeline/toy/weights (README "The toy model": about 2 h 15 min on one CPU core:
# autoencoder 12 min, UNet 1 h 58 min, toy-clip 3 min; resumable, a checkpoint every 10 minutes).
toy-model: $(STAMP)
	$(BIN)/python -m pipeline.toy.train --out pipeline/toy/weights

# Measure the paper's claims on the toy model (JSON + trade-off plot in out/toy-eval).
toy-eval: $(STAMP)
	$(BIN)/python -m pipeline.toy.evaluate --out out/toy-eval

bench: $(STAMP)
	$(BIN)/imprint bench --out bench.json

# On a machine with one CUDA GPU (under 8 minutes on an H100/H200); see tools/gpu-check.sh.
gpu-check: $(STAMP)
	PYTHON=$(BIN)/python tools/gpu-check.sh out/gpu-check

# The same steps on the CPU with the tiny model (also run by `make test-slow`).
gpu-check-smoke: $(STAMP)
	PYTHON=$(BIN)/python tools/gpu-check.sh --cpu-smoke out/gpu-check-smoke

schemas: $(STAMP)
	$(BIN)/imprint schemas --write schemas/

clean:
	rm -rf .cache out
