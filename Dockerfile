# syntax=docker/dockerfile:1
# TuFT image: the API and the workers run from the same image (`tuft api`, `tuft worker`).
#
#   docker build -t tuft:local .
#
# Reproducible: every package is installed at the version of constraints.txt, which `make
# constraints` writes from the venv `make test` ran in, and torch at TORCH_SPEC (the Makefile's).
# Without internet: put the wheels in ./wheels and build with --build-arg PIP_NO_INDEX=1
# (docs/deployment.md "Building without internet access").
#
# torch: the default wheel from PyPI on x86_64 Linux is the CUDA build (it brings its own CUDA
# runtime libraries; the host needs only the NVIDIA driver and the NVIDIA Container Toolkit).
# To pin a CUDA version, or to build a much smaller CPU-only image, point TORCH_INDEX_URL at one
# of PyTorch's wheel indexes, for example:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t tuft:cpu .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t tuft:cu128 .
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
# Offline builds: 1 = take every package from ./wheels only (the build context's wheelhouse).
ARG PIP_NO_INDEX=""

# The dev key is off in the image: its default command listens on 0.0.0.0, where a well-known key
# would let anyone who reaches the published port in (tuft refuses that combination anyway unless
# TUFT_ALLOW_DEV_KEY_ON_NETWORK=1). Create a key with `docker exec <container> tuft keys create`.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TUFT_DATA_DIR=/data \
    TUFT_DEV_KEY_ENABLED=false

# 1. torch alone: the largest layer, rebuilt only when the build arguments change.
# ./wheels (absent: pip only warns) is mounted, not copied: it stays out of the image's layers.
RUN --mount=type=bind,target=/ctx \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --find-links /ctx/wheels --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    else \
        pip install --find-links /ctx/wheels "$TORCH_SPEC"; \
    fi

# 2. The other dependencies, read from pyproject.toml, at the tested versions (constraints.txt; it
#    also brings torch's own dependencies to them): rebuilt only when either file changes.
COPY pyproject.toml constraints.txt /tmp/
RUN --mount=type=bind,target=/ctx \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --find-links /ctx/wheels -c /tmp/constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt /tmp/pyproject.toml /tmp/constraints.txt

# 3. TuFT itself (app, workers, migrations), installed as a regular package.
#    Copied folder by folder: `COPY . /src` would put ./wheels in a layer of the image. Its build
#    backend, setuptools, also comes from ./wheels when offline.
COPY pyproject.toml README.md /src/
COPY app /src/app
COPY workers /src/workers
COPY migrations /src/migrations
RUN --mount=type=bind,target=/ctx pip install --find-links /ctx/wheels --no-deps /src && rm -rf /src

RUN useradd --create-home --uid 1000 tuft && mkdir -p /data && chown tuft:tuft /data
USER tuft
WORKDIR /home/tuft
VOLUME ["/data"]
EXPOSE 10610

# For the default command (`tuft launch`: API and worker in one container): ready = the API answers
# and its worker heartbeats (app/api/readiness.py). compose.yaml gives `tuft api` the same check and
# each `tuft worker` container its own (`tuft worker-health`); the first start builds the model.
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:10610/readyz', timeout=5)"]

ENTRYPOINT ["tuft"]
# Without arguments: the one-machine mode (SQLite in /data, one worker in the same container), with
# API keys from `tuft keys create` only (no dev key, see above).
CMD ["launch", "--host", "0.0.0.0"]
