# syntax=docker/dockerfile:1
# loraplex server image.
#
#   GPU (default): docker build -t loraplex .
#   CPU only:      docker build -t loraplex:cpu --build-arg VARIANT=cpu .
#   run:           docker run --gpus all -p 50051:50051 -p 9090:9090 \
#                    -v "$PWD/adapters:/adapters" -v loraplex-models:/models loraplex --base-model Qwen/Qwen2.5-0.5B
#
# The container runs `loraplex serve` as the unprivileged user `loraplex` (uid and gid 10001). Every flag of
# `loraplex serve` can be given after the image name or as an environment variable LORAPLEX_<FLAG>
# (docs/configuration.md). Volumes: /adapters (adapter directories, loaded at start; LoadAdapter paths are
# relative to it) and /models (the Hugging Face cache, HF_HOME: models downloaded once survive restarts).
# Ports: 50051 gRPC (+ gRPC health and reflection), 9090 Prometheus /metrics.

ARG VARIANT=cuda
# CUDA 12.8 + cuDNN 9 runtime with PyTorch in /opt/conda
ARG CUDA_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
ARG CPU_IMAGE=python:3.12-slim-bookworm

FROM ${CUDA_IMAGE} AS base-cuda

FROM ${CPU_IMAGE} AS base-cpu
ARG TORCH_VERSION=2.9.1
# a C compiler for the CPU grouped kernel, built at first use for the host's CPU (adapters/kernels/cpu.py);
# without one, steps that mix many adapters run on plain torch, 8-13% slower under zipf1000
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models \
    LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_PORT=50051 \
    LORAPLEX_METRICS_PORT=9090 \
    LORAPLEX_ADAPTER_DIR=/adapters

WORKDIR /opt/loraplex
# the client first: the server depends on it and it is not on a registry
COPY clients/python ./clients/python
RUN pip install --no-cache-dir ./clients/python
COPY pyproject.toml README.md ./
COPY loraplex ./loraplex
COPY adapters ./adapters
COPY server ./server
COPY trainer ./trainer
# torch is already installed (either base); pip keeps it
RUN pip install --no-cache-dir . \
    && groupadd --system --gid 10001 loraplex \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/loraplex --create-home --shell /usr/sbin/nologin loraplex \
    && mkdir -p /adapters /models \
    && chown 10001:10001 /adapters /models \
    && loraplex --version

USER 10001:10001
VOLUME ["/adapters", "/models"]
EXPOSE 50051 9090
# NOT_SERVING until the model is loaded and warmed up (start-period covers a first model download);
# `loraplex health` asks the gRPC health service on $LORAPLEX_PORT and needs no token
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 CMD ["loraplex", "health", "--timeout", "4"]
# SIGTERM drains: in-flight requests get up to --shutdown-grace (30 s) to finish; give `docker stop -t 40`
STOPSIGNAL SIGTERM
ENTRYPOINT ["loraplex", "serve"]
