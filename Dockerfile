# The Loom on a CUDA GPU: `docker build -t loom . && docker run --gpus all -p 8080:8080 loom`
# Preload a model: `docker run --gpus all -p 8080:8080 loom loom serve --preload Qwen/Qwen2.5-0.5B`
# Keep downloaded models between runs: `-v ~/.cache/huggingface:/app/.cache/huggingface`
# A CPU-only image (about 1 GB smaller): `docker build --build-arg BASE=ubuntu:24.04 \
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t loom-cpu .`
ARG BASE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
FROM ${BASE}
# torch pinned as scripts/dev.sh pins it, from the wheel index of the image's kind (CUDA 12.6 or CPU).
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126

# Ubuntu 24.04 ships Python 3.12 (the kernel needs >= 3.11; 22.04 only has 3.10).
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment: the system Python is externally managed (PEP 668).
RUN python3 -m venv /opt/loom
ENV PATH=/opt/loom/bin:$PATH

# torch first, in its own layer: it is most of the image and does not change when the code does.
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH}"

# The kernel, every plugin under plugins/, the shipped models and the client, resolved together in one pip call
# (torch named again so that no dependency swaps it for another build).
COPY . /src
RUN pip install "${TORCH}" /src $(ls -d /src/plugins/*/ /src/models/*/) /src/client && rm -rf /src

# Run as an unprivileged user; /app is its home and the Hugging Face cache lives under it (the seed's volume path).
# UID 1000 matches the usual owner of a mounted ~/.cache/huggingface; the base image's own `ubuntu` user has it.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --home-dir /app --uid 1000 --shell /usr/sbin/nologin loom
USER loom
WORKDIR /app
ENV HOME=/app \
    HF_HOME=/app/.cache/huggingface \
    LOOM_HOST=0.0.0.0 \
    LOOM_PORT=8080

EXPOSE 8080

# Python rather than curl: nothing extra in the image. urlopen raises (exit 1) on refusal or a non-2xx status.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LOOM_PORT', '8080'), timeout=8)"

# Exec form: loom is PID 1 and receives SIGTERM from `docker stop` itself, shutting down gracefully.
CMD ["loom", "serve"]
