# syntax=docker/dockerfile:1
# dropout_lab for GPU nodes: python -m dropout_lab as a non-root user, FashionMNIST baked in (trains offline).
#
#   docker build -t dropout-lab .                                   # add --secret id=ca,src=CA.pem behind a TLS proxy
#   docker run --gpus all -v "$PWD/lightning_logs:/app/lightning_logs" dropout-lab \
#       fit --config configs/mlp.yaml --trainer.accelerator gpu
#   docker run -p 6006:6006 -v "$PWD/lightning_logs:/app/lightning_logs" --entrypoint tensorboard dropout-lab \
#       --logdir /app/lightning_logs --bind_all
#
# BASE_IMAGE: torch 2.14.1 from PyPI is a CUDA 13.0 build that brings its own CUDA libraries as pip wheels
# (cuda-toolkit 13.0.3, cuDNN 9, NCCL), so the base needs only what the NVIDIA container toolkit looks for:
# CUDA 13.0's `base` image (cudart, compat libraries, NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES).
# The `-runtime-` flavour of the same tag would add a second copy of cuBLAS, cuFFT & co. that torch never loads.
# Other Debian/Ubuntu bases with python3 >= 3.10 can be passed with --build-arg BASE_IMAGE=...; `make docker-smoke`
# builds on a local Debian bookworm (python 3.11) that way.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# One stage: the only build-time extras are python3-venv (a few MB) and the package source (~250 kB), while the
# 5.5 GB virtual environment has to be in the final image either way; a second stage would save those few MB at
# the cost of copying 5.5 GB on every build.
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python from the distribution, and FashionMNIST from its `dataset-fashion-mnist` package where it has one
# (Debian, Ubuntu universe): gzip IDX files in /usr/share/datasets/fashion-mnist, where the DataModule looks.
# g++ and python3-dev serve torch.compile (the CompileModule callback): Triton builds its GPU launcher with the C
# compiler and Python's headers, and Inductor's CPU kernels are C++.
# Package versions follow BASE_IMAGE, so they are not pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ca-certificates \
    && if apt-cache show dataset-fashion-mnist >/dev/null 2>&1; then \
        apt-get install -y --no-install-recommends dataset-fashion-mnist; fi \
    && rm -rf /var/lib/apt/lists/*

# torch first, pinned as in the Makefile (TORCH_PINS). PIP_EXTRA_INDEX_URL adds local package indexes (space
# separated; empty: PyPI only). The CA bundle of a TLS-inspecting proxy comes in as the build secret `ca`
# (docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt); it is used only while it is mounted
# and never stored in a layer.
ARG TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
ARG PIP_EXTRA_INDEX_URL=""
# TORCH_PINS is a list of pinned requirements, split into words on purpose (SC2086); hadolint does not see
# the pins through the variable (DL3013).
# hadolint ignore=SC2086,DL3013
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ -z "$PIP_EXTRA_INDEX_URL" ]; then unset PIP_EXTRA_INDEX_URL; fi; \
    python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir $TORCH_PINS

# The package (non-editable), with its dependencies; the torch already installed satisfies its torch>=2.6.
COPY pyproject.toml README.md /tmp/src/
COPY dropout_lab /tmp/src/dropout_lab
# The package's own dependencies are ranges in pyproject.toml, not pins (DL3013 asks for pins).
# hadolint ignore=DL3013
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ -z "$PIP_EXTRA_INDEX_URL" ]; then unset PIP_EXTRA_INDEX_URL; fi; \
    pip install --no-cache-dir /tmp/src \
    && rm -rf /tmp/src

# Bases without the Debian package: torchvision downloads the four gzip files at build time instead.
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export SSL_CERT_FILE=/run/secrets/ca; fi; \
    dest=/usr/share/datasets/fashion-mnist; \
    if [ ! -s "$dest/train-images-idx3-ubyte.gz" ]; then \
        python -c "from torchvision.datasets import FashionMNIST as F; \
            F('/tmp/fm', download=True); F('/tmp/fm', train=False, download=True)" \
        && mkdir -p "$dest" && cp /tmp/fm/FashionMNIST/raw/*.gz "$dest"/ && rm -rf /tmp/fm; \
    fi \
    && test -s "$dest/t10k-labels-idx1-ubyte.gz"

# The non-root user. APP_UID defaults to 1000, the usual uid of the first user on a host, so bind-mounted
# lightning_logs stay writable; build with --build-arg APP_UID="$(id -u)" to match yours. A user the base
# already has at that uid (Ubuntu 24.04 images ship `ubuntu` as 1000) is replaced.
ARG APP_UID=1000
RUN old="$(getent passwd "$APP_UID" | cut -d: -f1)"; \
    if [ -n "$old" ]; then userdel --remove "$old" 2>/dev/null || userdel "$old"; fi; \
    useradd --create-home --uid "$APP_UID" --user-group --shell /bin/bash lab \
    && mkdir -p /app/lightning_logs /app/data \
    && chown lab:lab /app /app/lightning_logs /app/data

WORKDIR /app
COPY configs ./configs
USER ${APP_UID}

# Run output and the unpacked data (the baked-in gzip files stay in /usr/share/datasets/fashion-mnist).
VOLUME ["/app/lightning_logs", "/app/data"]
EXPOSE 6006

ENTRYPOINT ["python", "-m", "dropout_lab"]
CMD ["fit", "--config", "configs/mlp.yaml"]
