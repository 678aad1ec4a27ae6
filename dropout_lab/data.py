"""FashionMNIST as a Lightning DataModule: offline sources, tensor-resident batches, a seeded validation split."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, Dataset, Subset

from dropout_lab.augment import BatchAugment
from dropout_lab.batches import EpochPermutation, StackedBatchLoader, TensorBatchLoader, epoch_generator, take
from dropout_lab.idx import DataError, find_or_install, load_arrays

__all__ = ["EpochPermutation", "FashionMNISTDataModule", "StackedBatchLoader", "TensorBatchLoader", "epoch_generator"]


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
        train_x = take(arrays.train_images, train_idx)
        if self.hparams.normalize:
            pixels = train_x.to(torch.float64) / 255.0
            self.mean, self.std = pixels.mean().item(), pixels.std().item()
        if self.trainer is not None and self.hparams.loader == "tensor":
            self.device = self.trainer.strategy.root_device
        splits = {
            "train": (train_x, take(arrays.train_labels, train_idx)),
            "val": (take(arrays.train_images, val_idx), take(arrays.train_labels, val_idx)),
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
