# syntax=docker/dockerfile:1
# One image for the three services: `specfleet router|draft|target ...` (the Helm chart runs each as a Deployment).
#
#   docker build -t specfleet/specfleet:0.1.0-cpu .                         # CPU torch on python:3.11-slim
#   docker build --build-arg FLAVOR=cuda -t specfleet/specfleet:0.1.0-cuda .  # CUDA torch for GPU nodes
#   docker build --build-arg LLAMA_CPP=on -t specfleet/specfleet:0.1.0-cpu-llama .  # with llama.cpp (see below)
#
# The model cache (converted presets, hub downloads) is /cache; mount a volume there to keep it across restarts.

ARG FLAVOR=cpu
ARG LLAMA_CPP=off

# CPU: Debian slim with CPython 3.11 and the CPU build of torch, and a C compiler: each service builds its CPU
# attention kernel (specfleet/engine/cpu_attention.c) at start for the node's own CPU, cached under /cache.
FROM python:3.11-slim AS base-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL}
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv

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

# llama.cpp, for the llamacpp drafter and the target's llamacpp backend (pyproject.toml's llamacpp extra): with
# LLAMA_CPP=on a builder stage compiles llama-cpp-python's wheel, which the image installs; off (the default) leaves it
# out. Built for any x86-64 node with AVX2: not for the build machine's CPU (a native build crashed on CPUs with AMX
# tiles, and an AVX-512 build dies on a node without it), and without OpenMP, so the slim image needs no libgomp.
# hadolint ignore=DL3006
FROM base-${FLAVOR} AS llama-cpp-off
RUN mkdir /wheels

# hadolint ignore=DL3006
FROM base-${FLAVOR} AS llama-cpp-on
ARG LLAMA_CPP_VERSION=0.3.36
ARG LLAMA_CPP_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=OFF"
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/* \
    && CMAKE_ARGS="${LLAMA_CPP_CMAKE_ARGS}" /opt/venv/bin/pip wheel --no-cache-dir --no-deps -w /wheels \
        "llama-cpp-python==${LLAMA_CPP_VERSION}"

# hadolint ignore=DL3006
FROM llama-cpp-${LLAMA_CPP} AS llama-cpp

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
COPY --from=llama-cpp /wheels /tmp/llama-cpp-wheels
# The llama.cpp wheel, if the build made one (find runs pip only for a file it finds).
RUN pip install . \
    && find /tmp/llama-cpp-wheels -name "*.whl" -exec pip install {} + \
    && rm -rf /src /tmp/llama-cpp-wheels

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin specfleet \
    && mkdir -p /cache \
    && chown specfleet:specfleet /cache
USER 10001:10001
WORKDIR /home/specfleet

# router, draft, target gRPC ports and the Prometheus metrics port
EXPOSE 50050 50051 50052 9464 8000
ENTRYPOINT ["specfleet"]
CMD ["--help"]
