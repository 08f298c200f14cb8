# syntax=docker/dockerfile:1
# Two targets:
#   docker build --target runtime -t blayers:cuda .     # GPU image, entrypoint blayers-train
#   docker build --target test -t blayers:test . && docker run --rm blayers:test   # CPU tests

# ---- GPU runtime: CUDA 12 runtime + jax[cuda12] and the project --------------------------
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04 AS runtime
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip make \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY blayers ./blayers
COPY train ./train
COPY configs ./configs
RUN pip install --upgrade pip && pip install ".[cuda]"
# configs are read from the source tree; runs and data live on a mounted volume
ENV BLAYERS_CONFIG_DIR=/app/configs
VOLUME ["/runs"]
ENTRYPOINT ["blayers-train"]
CMD ["run_dir=/runs/default", "data.path=/runs/data/train.parquet"]

# ---- CPU test stage: the same test command as CI ---------------------------------------
FROM python:3.11-slim AS test
RUN apt-get update && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN make install
CMD ["make", "test"]
