"""Shared fixtures: small synthetic FashionMNIST IDX files, and isolation from the real data.

Every test runs with ``dropout_lab.idx.DEBIAN_DIR`` pointed at a folder that does not exist and without
``$FASHION_MNIST_DIR``, so no test sees the real data unless it asks for the ``real_data`` fixture. Nothing
here downloads anything.
"""

from __future__ import annotations

import gzip
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
try:  # the package is normally installed (pip install -e .); fall back to the checkout
    import dropout_lab  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the suite is started
    sys.path.insert(0, str(ROOT))

from dropout_lab import idx  # noqa: E402

REAL_DEBIAN_DIR = idx.DEBIAN_DIR
N_TRAIN, N_TEST = 600, 100
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def idx_images_bytes(images: np.ndarray, magic: int = IMAGE_MAGIC, count: int | None = None) -> bytes:
    """IDX bytes for uint8 images (N, rows, cols); ``magic``/``count`` override the header (to make bad files)."""
    n, rows, cols = images.shape
    header = struct.pack(">iiii", magic, n if count is None else count, rows, cols)
    return header + images.astype(np.uint8).tobytes()


def idx_labels_bytes(labels: np.ndarray, magic: int = LABEL_MAGIC, count: int | None = None) -> bytes:
    """IDX bytes for uint8 labels (N,)."""
    header = struct.pack(">ii", magic, len(labels) if count is None else count)
    return header + labels.astype(np.uint8).tobytes()


def synthetic_set(n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0) -> dict[str, np.ndarray]:
    """Random 28×28 uint8 images and labels 0–9 (every class present in both splits)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    return arrays


def write_file(path: Path, data: bytes, gz: bool) -> Path:
    """Write ``data`` to ``path`` (gzip-compressed when ``gz``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb", compresslevel=1) as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_set(directory: Path, gz: bool, arrays: dict[str, np.ndarray] | None = None) -> dict[str, Path]:
    """Write the four IDX files of ``arrays`` (default: :func:`synthetic_set`) into ``directory``."""
    arrays = synthetic_set() if arrays is None else arrays
    suffix = ".gz" if gz else ""
    paths = {}
    for key, name in idx.FILES.items():
        to_bytes = idx_images_bytes if key.endswith("images") else idx_labels_bytes
        paths[key] = write_file(directory / (name + suffix), to_bytes(arrays[key]), gz)
    return paths


@pytest.fixture(autouse=True)
def _no_real_data(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Hide every real data source: Debian's folder → a missing folder, no ``$FASHION_MNIST_DIR``."""
    monkeypatch.setattr(idx, "DEBIAN_DIR", tmp_path_factory.getbasetemp() / "no-debian-dataset")
    monkeypatch.delenv(idx.ENV_DIR, raising=False)
    # seed_everything (run by the CLI in process) exports PL_GLOBAL_SEED; make sure it is restored afterwards
    monkeypatch.setenv("PL_GLOBAL_SEED", os.environ.get("PL_GLOBAL_SEED", "0"))
    monkeypatch.delenv("PL_GLOBAL_SEED")


@pytest.fixture(autouse=True)
def _restore_matmul_precision() -> Iterator[None]:
    """``--float32_matmul_precision`` (a CLI run in process, e.g. configs/mlp_fast.yaml) sets a global: reset it."""
    import torch

    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def real_data(_no_real_data: None, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Opt out of the isolation: the real Debian folder is searched again. Returns that folder."""
    monkeypatch.setattr(idx, "DEBIAN_DIR", REAL_DEBIAN_DIR)
    return REAL_DEBIAN_DIR


@pytest.fixture
def synthetic() -> dict[str, np.ndarray]:
    """The arrays written by ``gz_dir`` and ``tv_data_dir`` (600 train + 100 test images)."""
    return synthetic_set()


@pytest.fixture
def gz_dir(tmp_path: Path) -> Path:
    """A folder with the four gzip IDX files (``*-ubyte.gz``), laid out like Debian's dataset-fashion-mnist."""
    directory = tmp_path / "gz"
    write_set(directory, gz=True)
    return directory


@pytest.fixture(scope="session")
def shared_gz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One read-only ``gz_dir`` for the whole session (for CLI runs that only read it)."""
    directory = tmp_path_factory.mktemp("shared-gz")
    write_set(directory, gz=True)
    return directory


@pytest.fixture
def synthetic_env(monkeypatch: pytest.MonkeyPatch, shared_gz_dir: Path, tmp_path: Path) -> None:
    """The synthetic set (600 training images, 100 of them for validation), from an empty working folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(idx.ENV_DIR, str(shared_gz_dir))


@pytest.fixture
def tv_data_dir(tmp_path: Path) -> Path:
    """A ``data_dir`` holding the raw IDX files in torchvision's layout (``FashionMNIST/raw/*-ubyte``)."""
    data_dir = tmp_path / "tv-data"
    write_set(idx.torchvision_raw_dir(data_dir), gz=False)
    return data_dir


@pytest.fixture
def idx_kit() -> SimpleNamespace:
    """The writers above, for tests that build their own (often broken) files."""
    return SimpleNamespace(
        images_bytes=idx_images_bytes,
        labels_bytes=idx_labels_bytes,
        synthetic_set=synthetic_set,
        write_file=write_file,
        write_set=write_set,
    )


def synthetic_cli_args(config: Path, tmp_path: Path) -> list[str]:
    """CLI options for an in-process run of ``config`` on CPU, on the synthetic set, writing only under tmp."""
    return [
        "--config",
        str(config),
        "--trainer.accelerator",
        "cpu",
        "--data.data_dir",
        str(tmp_path / "data"),
        "--data.val_size",
        "100",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
    ]
