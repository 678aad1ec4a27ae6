# make run   — create .venv, install everything, fetch the data if missing, train configs/mlp.yaml (then test)
# make test  — the same install, then lint + the test suite (this is what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEBIAN_DATA := /usr/share/datasets/fashion-mnist
TORCH_PINS  := torch==2.14.1 torchvision==0.29.1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help install data compiler run test lint bench clean-logs docker-smoke

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install -e ".[dev,regression]"
	touch $@

install: $(VENV)/.installed  ## create .venv with torch, the package and its dev tools

data:  ## install FashionMNIST from Debian (dataset-fashion-mnist) unless it is already there
	@if [ -f $(DEBIAN_DATA)/train-images-idx3-ubyte.gz ] || [ -f data/FashionMNIST/raw/train-images-idx3-ubyte ] \
	    || [ -n "$$FASHION_MNIST_DIR" ]; then echo "FashionMNIST: found"; \
	else $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends dataset-fashion-mnist; fi

compiler:  ## a C++ compiler for torch.compile's CPU code (the compile tests), from Debian if missing
	@command -v g++ >/dev/null || { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends g++; }

run: install data  ## train the d2l dropout MLP (configs/mlp.yaml), then test the best checkpoint
	$(PY) -m dropout_lab fit --config configs/mlp.yaml

lint: install  ## ruff, hadolint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

test: install data compiler lint  ## lint, then the test suite (slow and gpu tests excluded; see README)
	$(PY) -m pytest

bench: install data  ## speed benchmark: every training path of the d2l MLP side by side (benchmarks/speed.py)
	$(PY) benchmarks/speed.py

clean-logs:  ## remove every run under lightning_logs/
	find lightning_logs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +

docker-smoke:  ## build the Dockerfile (buildah, local Debian base) and run --help and a fast_dev_run fit in it (podman)
	scripts/docker-smoke.sh
