# syntax=docker/dockerfile:1
# One image for the three services: `specfleet router|draft|target ...` (the Helm chart runs each as a Deployment).
#
#   docker build -t specfleet/specfleet:0.1.0-cpu .                         # CPU torch on python:3.11-slim
#   docker build --build-arg FLAVOR=cuda -t specfleet/specfleet:0.1.0-cuda .  # CUDA torch for GPU nodes
#
# The model cache (converted presets, hub downloads) is /cache; mount a volume there to keep it across restarts.

ARG FLAVOR=cpu

# CPU: Debian slim with CPython 3.11 and the CPU build of torch.
FROM python:3.11-slim AS base-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL}
RUN python -m venv /opt/venv

# CUDA: NVIDIA's base image (the driver comes from the node; the CUDA torch wheels bring their own CUDA libraries)
# with Ubuntu's CPython 3.11 (the distribution's current patch release: not pinned).
FROM nvidia/cuda:12.8.1-base-ubuntu22.04 AS base-cuda
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL}
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

# The stage chosen by FLAVOR (base-cpu or base-cuda).
# hadolint ignore=DL3006
FROM base-${FLAVOR}
ARG TORCH_VERSION=2.13.0
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPECFLEET_CACHE=/cache \
    HF_HOME=/cache/huggingface

# torch first, from the flavor's index, so `pip install .` finds it satisfied and keeps it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY proto ./proto
COPY specfleet ./specfleet
COPY router ./router
COPY draft_service ./draft_service
COPY target_service ./target_service
RUN pip install . \
    && rm -rf /src

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin specfleet \
    && mkdir -p /cache \
    && chown specfleet:specfleet /cache
USER 10001:10001
WORKDIR /home/specfleet

# router, draft, target gRPC ports and the Prometheus metrics port
EXPOSE 50050 50051 50052 9464 8000
ENTRYPOINT ["specfleet"]
CMD ["--help"]
