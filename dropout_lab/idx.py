"""Reading, checking and locating FashionMNIST IDX files, offline first.

The four files of the set are IDX (``*-ubyte``) files, raw or gzip-compressed. Every file is checked before
use (magic number, item count against the file size, 28×28 images, labels in 0–9), and every problem is one
:class:`DataError` whose message names the file and the fix.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DEBIAN_DIR",
    "ENV_DIR",
    "FILES",
    "DataError",
    "FashionMNISTArrays",
    "find_or_install",
    "load_arrays",
    "read_idx",
    "torchvision_raw_dir",
]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "FASHION_MNIST_DIR"
IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FIX = (
    "install the data with `apt-get install dataset-fashion-mnist`, point $FASHION_MNIST_DIR at a folder "
    "with the four gzip IDX files, or pass --data.download true"
)


class DataError(ValueError):
    """A missing or unusable data file; the message names the file and the fix."""


@dataclass
class FashionMNISTArrays:
    """The whole set as uint8 tensors: images (N, 28, 28) and labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot be read ({err}); the file is damaged: {FIX}") from None


def read_idx(path: Path, kind: str) -> np.ndarray:
    """Read and check one IDX file.

    Args:
        path: the file, raw or ending in ``.gz``.
        kind: ``"images"`` (magic 2051, N×28×28) or ``"labels"`` (magic 2049, N values in 0–9).

    Returns:
        A uint8 array of shape (N, 28, 28) or (N,).

    Raises:
        DataError: the file is unreadable, truncated, or not the expected kind.
    """
    data = _read_bytes(path)
    magic_expected, ndim = (IMAGE_MAGIC, 3) if kind == "images" else (LABEL_MAGIC, 1)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated ({len(data)} bytes, no complete IDX header): {FIX}")
    magic = struct.unpack(">i", data[:4])[0]
    if magic != magic_expected:
        raise DataError(
            f"{path}: wrong IDX magic number {magic} (expected {magic_expected} for {kind}); "
            f"not a FashionMNIST {kind} file: {FIX}"
        )
    shape = struct.unpack(f">{ndim}i", data[4:header])
    if kind == "images" and tuple(shape[1:]) != (28, 28):
        raise DataError(f"{path}: images are {shape[1]}×{shape[2]}, expected 28×28: {FIX}")
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataError(
            f"{path}: truncated or padded (header says {shape[0]} items = {expected} bytes, "
            f"found {len(data) - header}): {FIX}"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    if kind == "labels" and array.size and int(array.max()) > 9:
        raise DataError(f"{path}: label {int(array.max())} out of range 0–9: {FIX}")
    return array


def torchvision_raw_dir(data_dir: Path) -> Path:
    """Where torchvision keeps the unpacked files: ``<data_dir>/FashionMNIST/raw``."""
    return Path(data_dir) / "FashionMNIST" / "raw"


def _find_in(directory: Path, gz: bool) -> dict[str, Path] | None:
    suffix = ".gz" if gz else ""
    paths = {key: directory / (name + suffix) for key, name in FILES.items()}
    return paths if all(p.is_file() for p in paths.values()) else None


def _check_all(paths: dict[str, Path]) -> dict[str, np.ndarray]:
    arrays = {key: read_idx(path, key.split("_")[1]) for key, path in paths.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(
                f"{paths[f'{split}_labels']}: {n_lab} labels for {n_img} images in "
                f"{paths[f'{split}_images']}; the files come from different sets: {FIX}"
            )
    return arrays


def _umask() -> int:
    """The process's umask (read by setting it, then set back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _unpack_into(arrays_paths: dict[str, Path], raw_dir: Path) -> None:
    """Unpack checked gzip files into torchvision's layout, atomically (no half-written files)."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for key, src in arrays_paths.items():
        dest = raw_dir / FILES[key]
        if dest.is_file():
            continue
        fd, tmp = tempfile.mkstemp(dir=raw_dir, prefix=f".{FILES[key]}.", suffix=".part")
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would keep a shared data_dir from other users
            with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
                shutil.copyfileobj(inp, out)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _download(data_dir: Path) -> None:
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(data_dir), train=True, download=True)
        FashionMNIST(str(data_dir), train=False, download=True)
    except Exception as err:  # network errors come in many types
        raise DataError(f"data.download: torchvision could not download FashionMNIST ({err}); {FIX}") from None


def gzip_sources() -> list[Path]:
    """Directories searched for the gzip IDX files, in order: ``$FASHION_MNIST_DIR``, then Debian's."""
    dirs = [Path(os.environ[ENV_DIR])] if os.environ.get(ENV_DIR) else []
    return [*dirs, DEBIAN_DIR]


def find_or_install(data_dir: str | Path, download: bool = False, check: bool = True) -> dict[str, Path]:
    """Make sure checked raw IDX files exist under ``<data_dir>/FashionMNIST/raw`` and return their paths.

    Sources, in order: torchvision's layout in ``data_dir``; gzip files in ``$FASHION_MNIST_DIR`` or
    ``/usr/share/datasets/fashion-mnist`` (unpacked into ``data_dir`` once); torchvision's download when
    ``download`` is true.

    Args:
        data_dir: the folder of the unpacked files.
        download: allow torchvision's download as the last source.
        check: check files already unpacked in ``data_dir`` (skip when :func:`load_arrays` follows: it checks).

    Raises:
        DataError: no source has usable files.
    """
    raw_dir = torchvision_raw_dir(Path(data_dir))
    found = _find_in(raw_dir, gz=False)
    if found is not None:
        if check:
            _check_all(found)
        return found
    for directory in gzip_sources():
        gz = _find_in(directory, gz=True)
        if gz is not None:
            _check_all(gz)
            try:
                _unpack_into(gz, raw_dir)
            except OSError as err:
                raise DataError(
                    f"data.data_dir: cannot unpack FashionMNIST into {raw_dir} ({err}); "
                    "choose a writable --data.data_dir with free space"
                ) from None
            return _find_in(raw_dir, gz=False)  # type: ignore[return-value]
    if download:
        _download(Path(data_dir))
        found = _find_in(raw_dir, gz=False)
        if found is not None:
            _check_all(found)
            return found
    searched = ", ".join(str(d) for d in [raw_dir, *gzip_sources()])
    raise DataError(f"data.data_dir: no FashionMNIST files in {searched}; {FIX}")


def load_arrays(paths: dict[str, Path]) -> FashionMNISTArrays:
    """Load the four checked files as uint8 tensors."""
    arrays = _check_all(paths)
    return FashionMNISTArrays(**{key: torch.from_numpy(a.copy()) for key, a in arrays.items()})
