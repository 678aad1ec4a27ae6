"""Data sources, file checks, the tensor batch loader and the DataModule, on small synthetic IDX files."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from dropout_lab import idx
from dropout_lab.batches import take
from dropout_lab.data import EpochPermutation, FashionMNISTDataModule, TensorBatchLoader
from dropout_lab.idx import DataError, find_or_install, load_arrays, torchvision_raw_dir

OLD = 1_000_000_000  # an mtime (2001) that a rewritten file could not have


def assert_same_set(loaded: idx.FashionMNISTArrays, arrays: dict[str, np.ndarray]) -> None:
    for key, expected in arrays.items():
        got = getattr(loaded, key)
        assert got.dtype == torch.uint8
        assert np.array_equal(got.numpy(), expected), key


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


# --- sources --------------------------------------------------------------------------------------------------


def test_torchvision_layout_in_data_dir(tv_data_dir: Path, synthetic: dict[str, np.ndarray]) -> None:
    paths = find_or_install(tv_data_dir)
    assert set(paths) == set(idx.FILES)
    assert all(p.parent == torchvision_raw_dir(tv_data_dir) for p in paths.values())
    assert_same_set(load_arrays(paths), synthetic)


def test_env_gzip_dir_unpacked_once(
    gz_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic: dict[str, np.ndarray]
) -> None:
    monkeypatch.setenv(idx.ENV_DIR, str(gz_dir))
    data_dir = tmp_path / "data"
    raw_dir = torchvision_raw_dir(data_dir)

    paths = find_or_install(data_dir)

    assert sorted(p.name for p in raw_dir.iterdir()) == sorted(idx.FILES.values())
    assert {key: p.name for key, p in paths.items()} == idx.FILES
    assert all(p.parent == raw_dir for p in paths.values())
    assert_same_set(load_arrays(paths), synthetic)
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in raw_dir.iterdir()} == {0o666 & ~umask}  # not mkstemp's 0600
    for path in raw_dir.iterdir():
        os.utime(path, (OLD, OLD))

    assert find_or_install(data_dir) == paths  # second call: torchvision layout found, nothing rewritten
    assert all(p.stat().st_mtime_ns == OLD * 10**9 for p in raw_dir.iterdir())
    assert files_under(data_dir) == sorted(f"FashionMNIST/raw/{name}" for name in idx.FILES.values())


def test_debian_gzip_dir(gz_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic) -> None:
    monkeypatch.setattr(idx, "DEBIAN_DIR", gz_dir)
    data_dir = tmp_path / "data"
    paths = find_or_install(data_dir)
    assert all(p.parent == torchvision_raw_dir(data_dir) for p in paths.values())
    assert_same_set(load_arrays(paths), synthetic)


def test_precedence_torchvision_then_env_then_debian(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, idx_kit, tv_data_dir: Path, synthetic
) -> None:
    env_set, debian_set = idx_kit.synthetic_set(seed=1), idx_kit.synthetic_set(seed=2)
    idx_kit.write_set(tmp_path / "env", gz=True, arrays=env_set)
    idx_kit.write_set(tmp_path / "debian", gz=True, arrays=debian_set)
    monkeypatch.setenv(idx.ENV_DIR, str(tmp_path / "env"))
    monkeypatch.setattr(idx, "DEBIAN_DIR", tmp_path / "debian")

    assert_same_set(load_arrays(find_or_install(tv_data_dir)), synthetic)  # torchvision layout wins
    assert_same_set(load_arrays(find_or_install(tmp_path / "d1")), env_set)  # then $FASHION_MNIST_DIR
    monkeypatch.delenv(idx.ENV_DIR)
    assert_same_set(load_arrays(find_or_install(tmp_path / "d2")), debian_set)  # then Debian's folder


def test_incomplete_gzip_dir_is_skipped(gz_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (gz_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv(idx.ENV_DIR, str(gz_dir))
    with pytest.raises(DataError, match=r"data\.data_dir"):
        find_or_install(tmp_path / "data")


def test_missing_everywhere_names_data_dir_and_fix(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as info:
        find_or_install(data_dir, download=False)
    message = str(info.value)
    assert message.startswith("data.data_dir:")
    assert str(torchvision_raw_dir(data_dir)) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert not data_dir.exists()


# --- bad files ------------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_CASES = {
    # name: (file key to break, how)
    "truncated": "train_images",
    "wrong_magic": "train_images",
    "label_out_of_range": "train_labels",
    "not_28x28": "test_images",
    "count_mismatch": "train_labels",
    "labels_magic_in_images_file": "test_images",
}


def _write_bad_set(case: str, directory: Path, gz: bool, kit) -> Path:
    """Write a synthetic set with one broken file; return the path that the error must name."""
    arrays = kit.synthetic_set()
    paths = kit.write_set(directory, gz=gz, arrays=arrays)
    key = BAD_CASES[case]
    path = paths[key]
    if case == "truncated":
        _truncate(path)
    elif case == "wrong_magic":
        kit.write_file(path, kit.images_bytes(arrays[key], magic=1234), gz)
    elif case == "labels_magic_in_images_file":
        kit.write_file(path, kit.images_bytes(arrays[key], magic=2049), gz)
    elif case == "label_out_of_range":
        labels = arrays[key].copy()
        labels[7] = 10
        kit.write_file(path, kit.labels_bytes(labels), gz)
    elif case == "not_28x28":
        kit.write_file(path, kit.images_bytes(arrays[key][:, :27, :]), gz)
    elif case == "count_mismatch":
        kit.write_file(path, kit.labels_bytes(arrays[key][:-1]), gz)
    return path


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_gzip_source_names_file_and_leaves_nothing(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, idx_kit
) -> None:
    source = tmp_path / "gz"
    bad = _write_bad_set(case, source, gz=True, kit=idx_kit)
    monkeypatch.setenv(idx.ENV_DIR, str(source))
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as info:
        find_or_install(data_dir)
    assert str(bad) in str(info.value)
    # checked before unpacking: nothing (no *.part, no partial raw file) is left in data_dir
    assert not data_dir.exists() or files_under(data_dir) == []


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_raw_file_names_file(case: str, tmp_path: Path, idx_kit) -> None:
    data_dir = tmp_path / "data"
    bad = _write_bad_set(case, torchvision_raw_dir(data_dir), gz=False, kit=idx_kit)
    with pytest.raises(DataError) as info:
        find_or_install(data_dir)
    assert str(bad) in str(info.value)


def test_specific_messages(tmp_path: Path, idx_kit) -> None:
    arrays = idx_kit.synthetic_set()
    labels = arrays["train_labels"].copy()
    labels[3] = 10
    cases = {
        "label 10 out of range": idx_kit.labels_bytes(labels),
        "27×28, expected 28×28": idx_kit.images_bytes(arrays["train_images"][:, :27]),
        "wrong IDX magic number 2049": idx_kit.images_bytes(arrays["train_images"], magic=2049),
        "truncated": idx_kit.images_bytes(arrays["train_images"])[:-5],
        "header says 600 items": idx_kit.images_bytes(arrays["train_images"][:599], count=600),
    }
    for i, (expected, data) in enumerate(cases.items()):
        path = idx_kit.write_file(tmp_path / f"f{i}", data, gz=False)
        kind = "labels" if expected.startswith("label") else "images"
        with pytest.raises(DataError, match=expected):
            idx.read_idx(path, kind)


def test_not_gzip_at_all_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match=str(path)):
        idx.read_idx(path, "images")


def test_count_mismatch_names_both_files(tmp_path: Path, idx_kit) -> None:
    data_dir = tmp_path / "data"
    _write_bad_set("count_mismatch", torchvision_raw_dir(data_dir), gz=False, kit=idx_kit)
    with pytest.raises(DataError) as info:
        find_or_install(data_dir)
    assert "train-labels-idx1-ubyte" in str(info.value)
    assert "train-images-idx3-ubyte" in str(info.value)
    assert "599 labels for 600 images" in str(info.value)


def test_failure_while_unpacking_leaves_no_partial_files(
    gz_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic
) -> None:
    monkeypatch.setenv(idx.ENV_DIR, str(gz_dir))
    data_dir = tmp_path / "data"
    raw_dir = torchvision_raw_dir(data_dir)
    real_copy = idx.shutil.copyfileobj
    calls = []

    def failing_copy(src, dst, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second file: write a little, then fail like a full disk would
            dst.write(src.read(1000))
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(idx.shutil, "copyfileobj", failing_copy)
    with pytest.raises((OSError, DataError), match="No space left"):
        find_or_install(data_dir)
    left = files_under(data_dir)
    assert not any(name.endswith(".part") for name in left), left
    assert left == [f"FashionMNIST/raw/{next(iter(idx.FILES.values()))}"]  # only the complete first file
    monkeypatch.setattr(idx.shutil, "copyfileobj", real_copy)

    paths = find_or_install(data_dir)  # the next run finishes the job
    assert_same_set(load_arrays(paths), synthetic)
    assert sorted(p.name for p in raw_dir.iterdir()) == sorted(idx.FILES.values())


def test_truncated_gzip_message_says_damaged(tmp_path: Path, idx_kit) -> None:
    path = idx_kit.write_file(tmp_path / "x.gz", idx_kit.labels_bytes(np.zeros(5000, np.uint8)), gz=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="damaged"):
        idx.read_idx(path, "labels")
    with gzip.open(path, "rb") as f, pytest.raises(EOFError):
        f.read()  # (the file really is a truncated gzip stream)


# --- the tensor batch loader ----------------------------------------------------------------------------------


def coded_loader(n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle=True):
    """A loader whose sample i carries i in its label and (i % 256, i // 256) in its first two pixels."""
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    i = torch.arange(n)
    images[:, 0, 0], images[:, 0, 1] = (i % 256).to(torch.uint8), (i // 256).to(torch.uint8)
    sampler = EpochPermutation(n, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    return TensorBatchLoader(images, i.clone(), batch_size, sampler)


def epoch_indices(loader: TensorBatchLoader, epoch: int | None = None) -> list[torch.Tensor]:
    """The sample indices of each batch of one epoch (checked to agree between images and labels)."""
    if epoch is not None:
        loader.sampler.set_epoch(epoch)
    batches = []
    for x, y in loader:
        pixels = torch.round(x[:, 0, 0, :2] * 255).long()
        assert torch.equal(pixels[:, 0] + 256 * pixels[:, 1], y), "images and labels out of step"
        batches.append(y)
    return batches


@pytest.mark.parametrize(("n", "batch_size"), [(1000, 64), (1024, 64), (5, 8), (7, 1)])
def test_epoch_is_a_permutation_with_right_batches(n: int, batch_size: int) -> None:
    loader = coded_loader(n, batch_size)
    batches = epoch_indices(loader, 0)
    assert len(batches) == len(loader) == math.ceil(n / batch_size)
    assert all(len(b) == batch_size for b in batches[:-1])
    assert len(batches[-1]) == n - batch_size * (len(batches) - 1)  # drop_last=False
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(n))


def test_epochs_differ_and_repeat() -> None:
    loader = coded_loader(1000, 100, seed=3)
    e0, e1 = torch.cat(epoch_indices(loader, 0)), torch.cat(epoch_indices(loader, 1))
    assert not torch.equal(e0, e1)
    assert not torch.equal(e0, torch.arange(1000))
    assert torch.equal(torch.cat(epoch_indices(loader, 0)), e0)  # an epoch's order depends on (seed, epoch) only
    assert torch.equal(torch.cat(epoch_indices(coded_loader(1000, 100, seed=3), 1)), e1)  # same seed, same order
    assert not torch.equal(torch.cat(epoch_indices(coded_loader(1000, 100, seed=4), 1)), e1)  # other seed
    assert torch.equal(torch.cat(epoch_indices(loader)), e0)  # iterating again without set_epoch: same epoch


@pytest.mark.parametrize("shape", [(37,), (9, 4), (1,)])
def test_take_is_advanced_indexing(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (50,), generator=gen)
    idx = torch.randint(0, 50, shape, generator=gen)  # repeats included
    for source in (images, labels, images.transpose(1, 2)):  # a non-contiguous source too
        got = take(source, idx)
        assert got.dtype == source.dtype
        assert torch.equal(got, source[idx])


def test_unshuffled_is_file_order() -> None:
    loader = coded_loader(300, 64, shuffle=False)
    assert torch.equal(torch.cat(epoch_indices(loader, 5)), torch.arange(300))


class _Recorder(L.LightningModule):
    """Records the sample indices of each training epoch."""

    def __init__(self, loader: TensorBatchLoader) -> None:
        super().__init__()
        self.loader = loader
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.epochs: dict[int, list[torch.Tensor]] = {}

    def train_dataloader(self) -> TensorBatchLoader:
        return self.loader

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.epochs.setdefault(self.current_epoch, []).append(y.clone())
        return (self.weight * x.mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_sets_the_epoch_through_sampler() -> None:
    loader = coded_loader(200, 32, seed=11)
    module = _Recorder(loader)
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    assert sorted(module.epochs) == [0, 1, 2]
    for epoch, batches in module.epochs.items():
        assert len(batches) == len(loader) == 7
        expected = EpochPermutation(200, shuffle=True, seed=11)
        expected.set_epoch(epoch)
        assert torch.equal(torch.cat(batches), expected.indices()), f"epoch {epoch} not drawn for that epoch"
    assert loader.sampler.epoch == 2


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("n", [1000, 1001, 999])
def test_ddp_shards(world_size: int, n: int) -> None:
    loaders = [coded_loader(n, 64, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in (0, 1):
        shards = [torch.cat(epoch_indices(loader, epoch)) for loader in loaders]
        per_rank = math.ceil(n / world_size)
        assert all(len(s) == per_rank for s in shards)
        assert len({len(loader) for loader in loaders}) == 1
        assert all(len(epoch_indices(loader, epoch)) == len(loader) for loader in loaders)
        together = torch.cat(shards)
        assert torch.equal(together.unique(), torch.arange(n))  # together they cover every index
        assert len(together) - n == per_rank * world_size - n < world_size  # only the padding repeats
        # the shards interleave into one padded permutation, the same on every rank (as DistributedSampler)
        full = torch.cat(epoch_indices(coded_loader(n, 64, seed=5), epoch))
        padded = torch.cat([full, full[: per_rank * world_size - n]])
        assert torch.equal(torch.stack(shards, 1).flatten(), padded)


@pytest.mark.parametrize(("n", "world_size"), [(1, 3), (2, 5)])
def test_ddp_shards_smaller_than_world(n: int, world_size: int) -> None:
    loaders = [coded_loader(n, 8, rank=r, world_size=world_size) for r in range(world_size)]
    sizes = [len(torch.cat(epoch_indices(loader, 0))) for loader in loaders]
    assert sizes == [loader.sampler.num_samples() for loader in loaders] == [1] * world_size


# --- the DataModule -------------------------------------------------------------------------------------------


def rows(images: torch.Tensor) -> list[bytes]:
    return [bytes(row) for row in images.reshape(len(images), -1).cpu().numpy()]


def module(data_dir: Path, **kwargs) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), **kwargs)
    dm.setup("fit")
    return dm


def test_init_never_touches_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_disk(*args, **kwargs):
        raise AssertionError("__init__ looked for files")

    monkeypatch.setattr("dropout_lab.data.find_or_install", no_disk)
    data_dir = tmp_path / "does" / "not" / "exist"
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=True)
    assert not data_dir.exists() and not (tmp_path / "does").exists()
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


def test_prepare_data_unpacks_and_setup_loads(gz_dir: Path, tmp_path: Path, monkeypatch, synthetic) -> None:
    monkeypatch.setenv(idx.ENV_DIR, str(gz_dir))
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "data"), val_size=100)
    dm.prepare_data()
    assert sorted(p.name for p in torchvision_raw_dir(tmp_path / "data").iterdir()) == sorted(idx.FILES.values())
    dm.setup("fit")
    test_x, test_y = dm.splits["test"]
    assert np.array_equal(test_x.numpy(), synthetic["test_images"])
    assert np.array_equal(test_y.numpy(), synthetic["test_labels"])


def test_validation_split(tv_data_dir: Path, synthetic: dict[str, np.ndarray]) -> None:
    dm = module(tv_data_dir, val_size=100, batch_size=64)
    (train_x, train_y), (val_x, val_y) = dm.splits["train"], dm.splits["val"]
    assert (len(train_x), len(val_x)) == (500, 100)
    train_rows, val_rows, all_rows = (
        set(rows(train_x)),
        set(rows(val_x)),
        rows(torch.from_numpy(synthetic["train_images"])),
    )
    assert len(set(all_rows)) == 600  # (random images are distinct, so rows identify samples)
    assert not train_rows & val_rows
    assert train_rows | val_rows == set(all_rows)
    label_of = dict(zip(all_rows, synthetic["train_labels"].tolist(), strict=True))
    for x, y in ((train_x, train_y), (val_x, val_y)):
        assert [label_of[r] for r in rows(x)] == y.tolist()  # labels travel with their images
    assert train_y.dtype == val_y.dtype == torch.int64

    seen = torch.cat([x for x, _ in dm.val_dataloader()])
    assert sorted(rows((seen * 255).round().to(torch.uint8))) == sorted(val_rows)
    assert len(dm.val_dataloader()) == math.ceil(100 / 64)

    same = module(tv_data_dir, val_size=100, split_seed=0)
    assert torch.equal(same.splits["val"][0], val_x)
    other = module(tv_data_dir, val_size=100, split_seed=1)
    assert set(rows(other.splits["val"][0])) != val_rows


def test_val_size_zero_means_no_validation(tv_data_dir: Path) -> None:
    dm = module(tv_data_dir, val_size=0)
    assert dm.val_dataloader() == []
    assert len(dm.splits["train"][0]) == 600


@pytest.mark.parametrize("val_size", [600, 601, 10_000])
def test_val_size_too_large(tv_data_dir: Path, val_size: int) -> None:
    with pytest.raises(DataError, match=r"^data\.val_size"):
        module(tv_data_dir, val_size=val_size)


def test_batches_dtype_shape_range(tv_data_dir: Path) -> None:
    dm = module(tv_data_dir, val_size=100, batch_size=64)
    for loader, n in ((dm.train_dataloader(), 500), (dm.val_dataloader(), 100), (dm.test_dataloader(), 100)):
        total = 0
        for x, y in loader:
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape == (len(y), 1, 28, 28) and len(y) <= 64
            assert x.min() >= 0.0 and x.max() <= 1.0
            total += len(y)
        assert total == n
    x = torch.cat([x for x, _ in dm.test_dataloader()])
    assert x.max() == 1.0 and x.min() == 0.0  # 255 ↦ 1, 0 ↦ 0


def test_test_split_in_file_order(tv_data_dir: Path, synthetic) -> None:
    dm = module(tv_data_dir, val_size=100, batch_size=32)
    x, y = (torch.cat(t) for t in zip(*dm.test_dataloader(), strict=True))
    assert np.array_equal((x[:, 0] * 255).round().to(torch.uint8).numpy(), synthetic["test_images"])
    assert np.array_equal(y.numpy(), synthetic["test_labels"])


def test_normalize_standardizes_training_split(tv_data_dir: Path) -> None:
    dm = module(tv_data_dir, val_size=100, batch_size=128, normalize=True)
    x = torch.cat([x for x, _ in dm.train_dataloader()]).double()
    assert abs(x.mean().item()) < 1e-3
    assert abs(x.std().item() - 1) < 1e-3
    raw = dm.splits["train"][0].double() / 255
    assert dm.mean == pytest.approx(raw.mean().item()) and dm.std == pytest.approx(raw.std().item())


def test_shuffle_seed_defaults_to_run_seed(tv_data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def order(dm: FashionMNISTDataModule) -> list[bytes]:
        return rows(torch.cat([x for x, _ in dm.train_dataloader()]))

    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    from_run = module(tv_data_dir, val_size=100)
    assert order(from_run) == order(module(tv_data_dir, val_size=100, shuffle_seed=5))
    assert order(from_run) != order(module(tv_data_dir, val_size=100, shuffle_seed=6))
    assert order(from_run) == order(from_run)


@pytest.mark.parametrize("normalize", [False, True])
def test_torch_loader_matches_tensor_loader(tv_data_dir: Path, normalize: bool) -> None:
    tensor = module(tv_data_dir, val_size=100, batch_size=32, normalize=normalize)
    torch_dm = module(tv_data_dir, val_size=100, batch_size=32, loader="torch", normalize=normalize)
    assert (torch_dm.mean, torch_dm.std) == (tensor.mean, tensor.std)
    for split in ("train", "val", "test"):
        a = list(getattr(tensor, f"{split}_dataloader")())
        b = list(getattr(torch_dm, f"{split}_dataloader")())
        assert [(x.shape, x.dtype, y.shape, y.dtype) for x, y in a] == [
            (x.shape, x.dtype, y.shape, y.dtype) for x, y in b
        ]

        def samples(batches):
            x, y = (torch.cat(t) for t in zip(*batches, strict=True))
            pixels = ((x * tensor.std + tensor.mean) * 255).round().to(torch.uint8)  # undo the standardization
            return sorted(zip(rows(pixels), y.tolist(), strict=True))

        assert samples(a) == samples(b), split


class _DeviceProbe(L.LightningModule):
    """Records the device of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(28 * 28, 10)
        self.devices: set[str] = set()

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.devices |= {x.device.type, y.device.type}
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tensor_loader_keeps_the_set_on_the_gpu(tv_data_dir: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(tv_data_dir), val_size=100, batch_size=64)
    probe = _DeviceProbe()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="gpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(probe, datamodule=dm)
    assert probe.devices == {"cuda"}
    assert all(x.is_cuda and y.is_cuda for x, y in dm.splits.values())
