"""FashionMNIST as a Lightning DataModule: offline sources, tensor-resident batches, a seeded validation split."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, Dataset, Subset

from dropout_lab.augment import BatchAugment
from dropout_lab.idx import DataError, find_or_install, load_arrays

__all__ = ["EpochPermutation", "FashionMNISTDataModule", "StackedBatchLoader", "TensorBatchLoader", "epoch_generator"]

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded by (seed, epoch), so an epoch's draws do not depend on what ran before it.

    ``stream`` selects an independent sequence for the same (seed, epoch): 0 = sample order, 1 = augmentation.
    """
    entropy = [seed & 0xFFFFFFFF, epoch] + ([stream] if stream else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class EpochPermutation:
    """Draws the sample order of an epoch; Lightning calls :meth:`set_epoch` before each training epoch.

    Args:
        n: number of samples.
        shuffle: draw a fresh permutation each epoch (else the identity order).
        seed: base seed; the order of epoch ``e`` depends only on ``(seed, e)``.
        rank: this process's rank under DDP.
        world_size: number of processes; each takes every ``world_size``-th index of a padded permutation,
            so all ranks get the same number of samples (as ``DistributedSampler`` does).
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`indices` returns."""
        self.epoch = epoch

    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return math.ceil(self.n / self.world_size)

    def generator(self, stream: int) -> torch.Generator:
        """A generator for another random stream of the current epoch (e.g. augmentation draws)."""
        return epoch_generator(self.seed, self.epoch, stream)

    def indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch (int64, on the CPU)."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch))
        else:
            order = torch.arange(self.n)
        if self.world_size > 1:
            total = self.num_samples() * self.world_size
            if total > self.n:  # pad by repeating the order, as DistributedSampler does
                order = order.repeat(math.ceil(total / self.n))[:total]
            order = order[self.rank :: self.world_size]
        return order


class TensorBatchLoader:
    """Batches by index from uint8 tensors that already sit on the training device.

    Each batch is gathered with one indexing op and converted to float on the device: ``(x, y)`` with ``x``
    of shape (B, 1, 28, 28) and ``y`` int64. The last partial batch is kept (``drop_last=False``).

    Args:
        images: uint8 tensor (N, 28, 28) on the target device.
        labels: int64 tensor (N,) on the same device.
        batch_size: samples per batch.
        sampler: the per-epoch order (exposed as ``.sampler`` so Lightning's ``set_epoch`` call reaches it).
        mean: subtracted after scaling pixels to [0, 1].
        std: divides after subtracting ``mean``.
        augment: random flips/translations applied to each batch (training only); draws depend on
            (seed, epoch) alone.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        sampler: EpochPermutation,
        mean: float = 0.0,
        std: float = 1.0,
        augment: BatchAugment | None = None,
    ) -> None:
        self.images, self.labels, self.batch_size, self.sampler = images, labels, batch_size, sampler
        self.augment = augment if augment is not None and augment.active else None
        self.batch_sampler = None  # Lightning inspects it; the order comes from ``sampler``
        self.scale = 1.0 / (255.0 * std)
        self.shift = mean / std

    def __len__(self) -> int:
        return math.ceil(self.sampler.num_samples() / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = self.sampler.indices().to(self.images.device, non_blocking=True)
        draws = None
        if self.augment is not None:
            draws = self.augment.draw(len(order), self.sampler.generator(stream=1)).to(self.images.device)
        for start, idx in zip(range(0, len(order), self.batch_size), order.split(self.batch_size), strict=True):
            images = self.images[idx]
            if draws is not None:
                images = self.augment.apply(images, draws.slice(start, start + len(idx)))
            x = images.unsqueeze(1).to(torch.float32).mul_(self.scale)
            if self.shift:
                x.sub_(self.shift)
            yield x, self.labels[idx]


class _EpochFanOut:
    """The ``sampler`` of a :class:`StackedBatchLoader`: Lightning's ``set_epoch`` reaches every order."""

    def __init__(self, samplers: list[EpochPermutation]) -> None:
        self.samplers = samplers

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of every stacked order."""
        for sampler in self.samplers:
            sampler.set_epoch(epoch)


class StackedBatchLoader:
    """S training orders side by side, for :class:`~dropout_lab.population.PopulationMLP`: batch ``i`` of each.

    Loader ``s`` yields exactly the batches a single run with ``shuffle_seed`` = seed ``s`` gets (same order, same
    augmentation draws); they are stacked along a second axis, batch first: ``x`` (B, S, 1, 28, 28) and ``y``
    (B, S), so splitting a batch into micro-batches along the first axis works as for one order.

    Args:
        loaders: one :class:`TensorBatchLoader` per order, over the same images and batch size.
    """

    def __init__(self, loaders: list[TensorBatchLoader]) -> None:
        self.loaders = loaders
        self.sampler = _EpochFanOut([loader.sampler for loader in loaders])
        self.batch_sampler = None  # Lightning inspects it; the orders come from ``sampler``

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self) -> Iterator[Batch]:
        for batches in zip(*self.loaders, strict=True):
            xs, ys = zip(*batches, strict=True)
            yield torch.stack(xs, dim=1), torch.stack(ys, dim=1)


def _torchvision_dataset(
    data_dir: Path, split: str, index: torch.Tensor | None, mean: float, std: float, augment: BatchAugment
) -> Dataset:
    """Torchvision's own per-image ``FashionMNIST`` dataset (PIL + transforms), for ``loader: torch``."""
    from torchvision import datasets, transforms

    steps: list = []
    if split == "train" and augment.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    if split == "train" and augment.max_shift:
        steps.append(transforms.RandomCrop(28, padding=augment.max_shift))
    transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    dataset = datasets.FashionMNIST(str(data_dir), train=split != "test", transform=transform)
    return dataset if index is None else Subset(dataset, index.tolist())


def _run_seed() -> int:
    """The seed of this run: the one given to ``seed_everything`` (Lightning exports it), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class FashionMNISTDataModule(L.LightningDataModule):
    """FashionMNIST, read offline, with a seeded validation split of the 60k training images.

    Args:
        data_dir: folder for the unpacked files (torchvision layout ``<data_dir>/FashionMNIST/raw``).
        download: let torchvision download the set when no offline source has it.
        batch_size: samples per training and evaluation batch.
        val_size: images held out of the 60k training set for validation (0 = no validation).
        loader: ``tensor`` keeps the set on the training device and batches by index (fast);
            ``torch`` uses a per-image ``Dataset`` + ``DataLoader`` (the standard path, for comparison).
        num_workers: worker processes for ``loader: torch``.
        normalize: false = pixels in [0, 1] (as in the d2l book); true = standardize with the training
            mean and std.
        shuffle_seed: seed of the per-epoch training order; null = the run's ``seed_everything`` value.
        shuffle_seeds: for ``PopulationMLP`` (``study --population`` sets it): one training order per seed, each
            the order of a run with that ``shuffle_seed``, stacked batch first as x (B, S, 1, 28, 28) and
            y (B, S); member ``c<cell>s<j>`` trains on order j. Needs ``loader: tensor``; validation and test
            batches are unchanged. null = one order (``shuffle_seed``).
        split_seed: seed of the train/validation split (fixed, so every run validates on the same images).
        hflip: training augmentation: mirror each training image left-right with probability 1/2.
        max_shift: training augmentation: translate each training image by up to this many pixels along each
            axis (uniform integers, zero fill); 0 = off. Validation and test images are never augmented.
    """

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: PositiveInt = 256,
        val_size: NonNegativeInt = 5000,
        loader: Literal["tensor", "torch"] = "tensor",
        num_workers: NonNegativeInt = 0,
        normalize: bool = False,
        shuffle_seed: int | None = None,
        shuffle_seeds: list[int] | None = None,
        split_seed: int = 0,
        hflip: bool = False,
        max_shift: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        if shuffle_seeds is not None and (loader != "tensor" or not shuffle_seeds):
            raise ValueError(
                f"data.shuffle_seeds: stacked training orders need loader: tensor and at least one seed, got "
                f"loader: {loader}, shuffle_seeds: {shuffle_seeds}"
            )
        if shuffle_seeds is not None and shuffle_seed is not None:
            raise ValueError(
                f"data.shuffle_seed ({shuffle_seed}) and data.shuffle_seeds ({shuffle_seeds}): give one of them"
            )
        self.save_hyperparameters()
        self.augment = BatchAugment(hflip, max_shift)
        self.data_dir = Path(data_dir)
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mean, self.std = 0.0, 1.0
        self.device = torch.device("cpu")

    def prepare_data(self) -> None:
        """Find (or unpack, or download) and check the files, and check ``val_size``; assigns no state.

        Runs before the logger creates its run folder, so a bad ``val_size`` leaves nothing behind.
        """
        paths = find_or_install(self.data_dir, self.hparams.download)
        self._check_val_size(paths["train_labels"].stat().st_size - 8)  # IDX label file: 8-byte header, 1 B/label

    def _check_val_size(self, n_train: int) -> None:
        if self.hparams.val_size >= n_train:
            raise DataError(
                f"data.val_size: {self.hparams.val_size} is not smaller than the {n_train} training images; "
                "choose a smaller --data.val_size (0 = no validation)"
            )

    def setup(self, stage: str) -> None:
        """Load the set once, split it, and (tensor loader) move it to the training device."""
        if self.splits:
            return
        arrays = load_arrays(find_or_install(self.data_dir, self.hparams.download, check=False))  # load checks
        n_train = len(arrays.train_labels)
        self._check_val_size(n_train)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(self.hparams.split_seed))
        val_idx, train_idx = perm[: self.hparams.val_size], perm[self.hparams.val_size :]
        train_x = arrays.train_images[train_idx]
        if self.hparams.normalize:
            pixels = train_x.to(torch.float64) / 255.0
            self.mean, self.std = pixels.mean().item(), pixels.std().item()
        if self.trainer is not None and self.hparams.loader == "tensor":
            self.device = self.trainer.strategy.root_device
        splits = {
            "train": (train_x, arrays.train_labels[train_idx]),
            "val": (arrays.train_images[val_idx], arrays.train_labels[val_idx]),
            "test": (arrays.test_images, arrays.test_labels),
        }
        self.splits = {k: (x.to(self.device), y.long().to(self.device)) for k, (x, y) in splits.items()}
        self.split_index = {"train": train_idx, "val": val_idx, "test": None}

    def _loader(self, split: str) -> TensorBatchLoader | StackedBatchLoader | DataLoader:
        if not self.splits:
            raise RuntimeError("FashionMNISTDataModule: call setup() before asking for a dataloader")
        images, labels = self.splits[split]
        train = split == "train"
        if self.hparams.loader == "torch":
            return DataLoader(
                _torchvision_dataset(self.data_dir, split, self.split_index[split], self.mean, self.std, self.augment),
                batch_size=self.hparams.batch_size,
                shuffle=train,
                num_workers=self.hparams.num_workers,
                persistent_workers=self.hparams.num_workers > 0,
            )
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if train and self.trainer else (0, 1)
        seed = self.hparams.shuffle_seed if self.hparams.shuffle_seed is not None else _run_seed()
        stacked = self.hparams.get("shuffle_seeds") if train else None

        def loader(seed: int) -> TensorBatchLoader:
            sampler = EpochPermutation(len(labels), shuffle=train, seed=seed, rank=rank, world_size=world)
            augment = self.augment if train else None
            return TensorBatchLoader(images, labels, self.hparams.batch_size, sampler, self.mean, self.std, augment)

        return StackedBatchLoader([loader(s) for s in stacked]) if stacked else loader(seed)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Fast path for ``(x, y)`` pairs (a no-op when the tensor loader already holds them on the device)."""
        if isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in batch):
            return type(batch)(t.to(device, non_blocking=True) for t in batch)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> TensorBatchLoader | StackedBatchLoader | DataLoader:
        """Shuffled training batches (a new order each epoch)."""
        return self._loader("train")

    def val_dataloader(self) -> TensorBatchLoader | DataLoader | list:
        """Validation batches from the held-out split; none when ``val_size`` is 0."""
        return self._loader("val") if self.hparams.val_size else []

    def test_dataloader(self) -> TensorBatchLoader | DataLoader:
        """The 10k test images, in file order."""
        return self._loader("test")

    def predict_dataloader(self) -> TensorBatchLoader | DataLoader:
        """The 10k test images, in file order."""
        return self._loader("test")
