# syntax=docker/dockerfile:1
# Targets (all on the same Python base; versions pinned by constraints.txt):
#   docker build --target runtime -t blayers:cuda .   # NVIDIA GPUs: jax[cuda12], entrypoint blayers-train
#   docker build --target tpu -t blayers:tpu .        # Cloud TPU hosts: jax[tpu]
#   docker build --target test -t blayers:test . && docker run --rm blayers:test   # CPU test suite
# jax[cuda12] brings the CUDA and cuDNN libraries as wheels, so the GPU image needs no CUDA base
# image, only the host's NVIDIA driver (docker run --gpus all, or the Kubernetes device plugin).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY blayers ./blayers
COPY train ./train
COPY configs ./configs
# the default configs ship inside the package; this points at the source tree's copy, so a
# mounted configs/ can replace it. Runs and data live on a mounted volume
ENV BLAYERS_CONFIG_DIR=/app/configs

# ---- NVIDIA GPU runtime -------------------------------------------------------------------
FROM base AS runtime
RUN pip install -c constraints.txt ".[cuda]"
VOLUME ["/runs"]
ENTRYPOINT ["blayers-train"]
CMD ["run_dir=/runs/default", "data.path=/runs/data/train.parquet"]

# ---- Cloud TPU runtime --------------------------------------------------------------------
FROM base AS tpu
RUN pip install -c constraints.txt ".[tpu]"
VOLUME ["/runs"]
ENTRYPOINT ["blayers-train"]
CMD ["run_dir=/runs/default", "data.path=/runs/data/train.parquet"]

# ---- CPU test stage: the same test command as CI ------------------------------------------
FROM ${PYTHON_IMAGE} AS test
RUN apt-get update && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN make install
CMD ["make", "test"]
