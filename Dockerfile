# Postserve container image.
#
# CPU image (the default: Python 3.11 on Debian slim, CPU build of PyTorch):
#
#   docker build -t postserve .
#
# CUDA image: take a CUDA runtime base and a CUDA build of PyTorch, e.g.
#
#   docker build -t postserve:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 \
#     --build-arg TORCH_VERSION=2.6.0 .
#
#   TORCH_INDEX must carry a wheel of TORCH_VERSION for that CUDA version: PyTorch publishes
#   each release for a few CUDA versions only (cu124 stops at torch 2.6.0, which still meets
#   the project's torch>=2.4,<3), so for a newer torch pick the matching cuXYZ index and an
#   nvidia/cuda base of that CUDA version. The host needs the NVIDIA driver and the NVIDIA
#   container toolkit (docker run --gpus all ...). Ubuntu bases have no Python 3.11 of their
#   own, so the stages below install it with apt when the base lacks it (the CPU base has it).
#   POSTSERVE_DEVICE=auto (the default) then puts models on the GPU.
#
# Run (the server binds 0.0.0.0 only when API keys are configured; without keys it binds
# 127.0.0.1 inside the container and is unreachable from outside):
#
#   docker run -p 8000:8000 -e POSTSERVE_API_KEYS='change-me:admin,change-me-too:read' postserve

ARG BASE_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------------------------
# build: a virtual environment in /opt/venv with torch, then Postserve and its dependencies.
# --------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build

ARG DEBIAN_FRONTEND=noninteractive
# Only on bases without Python 3.11 (the nvidia/cuda Ubuntu images): Ubuntu's own python3.11.
# DL3008 (pin apt package versions) is ignored because the version is whatever the chosen base's
# release ships: a pin would break on every base but one.
# hadolint ignore=DL3008
RUN if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the PyTorch index (CPU build by default; an unpinned torch from PyPI is a
# multi-GB CUDA build), in its own layer so that code changes do not download it again.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# Then the project (a regular, non-editable install) with the rest of its dependencies from
# PyPI; the constraint keeps pip from swapping the torch build installed above.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN echo "torch==${TORCH_VERSION}" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt . \
    && rm /tmp/torch-constraint.txt \
    && postserve --help >/dev/null

# --------------------------------------------------------------------------------------------
# runtime: the venv, a non-root user, a data volume.
# --------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ARG DEBIAN_FRONTEND=noninteractive
# The same interpreter the venv was built against (no -venv package needed at run time).
# DL3008 ignored for the same reason as in the build stage: the version depends on the base.
# hadolint ignore=DL3008
RUN if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11 \
        && rm -rf /var/lib/apt/lists/*; \
    fi

RUN groupadd --system --gid 10001 postserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin postserve \
    && mkdir -p /app /var/lib/postserve \
    && chown 10001:10001 /var/lib/postserve

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    POSTSERVE_DATA_DIR=/var/lib/postserve

WORKDIR /app
VOLUME ["/var/lib/postserve"]
USER 10001:10001
EXPOSE 8000

# The slim base has no curl: ask /healthz with the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

CMD ["postserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
