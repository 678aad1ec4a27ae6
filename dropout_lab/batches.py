"""Training-order and batch iterators over tensors on the training device: seeded per epoch, stackable."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from dropout_lab.augment import AugmentDraws, BatchAugment

__all__ = ["Batch", "EpochPermutation", "StackedBatchLoader", "TensorBatchLoader", "epoch_generator"]

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


def take(source: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``source[idx]`` for an integer ``idx`` of any shape, as one ``index_select`` along the first axis.

    The same values as advanced indexing, which on the CPU copies element by element: ``benchmarks/gather.py``
    timed a gather of 2048 FashionMNIST uint8 images at 1.20 ms that way and 0.090 ms with ``index_select``
    (one thread, x86_64).
    """
    if idx.dim() == 1:
        return source.index_select(0, idx)
    return source.index_select(0, idx.flatten()).view(idx.shape + source.shape[1:])


class TensorBatchLoader:
    """Batches by index from uint8 tensors that already sit on the training device.

    Each batch is gathered with one ``index_select`` and converted to float on the device: ``(x, y)`` with ``x``
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

    def same_source(self, other: TensorBatchLoader) -> bool:
        """Whether ``other`` gathers the same tensors with the same batch size, scaling and augmentation."""

        def settings(x: TensorBatchLoader) -> tuple:
            augment = None if x.augment is None else (x.augment.hflip, x.augment.max_shift)
            return x.batch_size, x.scale, x.shift, augment

        return self.images is other.images and self.labels is other.labels and settings(self) == settings(other)

    def __iter__(self) -> Iterator[Batch]:
        # a generator: the epoch's order is drawn at the first batch, after Lightning's ``set_epoch``
        yield from self.batches(self.sampler.indices(), self.epoch_draws())

    def epoch_draws(self) -> AugmentDraws | None:
        """The augmentation draws of the sampler's current epoch (None without augmentation)."""
        if self.augment is None:
            return None
        return self.augment.draw(self.sampler.num_samples(), self.sampler.generator(stream=1))

    def batches(self, order: torch.Tensor, draws: AugmentDraws | None) -> Iterator[Batch]:
        """Batches along the first axis of ``order``: (N,) for one order, or (N, S) for S orders side by side.

        Each batch costs one gather, the augmentation (if any) and one float conversion, whatever S is; ``x`` has
        shape ``order[i:j].shape + (1, 28, 28)`` and ``y`` the shape of ``order[i:j]``. ``draws`` holds one row per
        entry of ``order`` (leading shape of ``order``).
        """
        order = order.to(self.images.device, non_blocking=True)
        if draws is not None:
            draws = draws.to(self.images.device)
        for start, idx in zip(range(0, len(order), self.batch_size), order.split(self.batch_size), strict=True):
            images = take(self.images, idx)  # idx.shape + (H, W)
            if draws is not None:
                flat = self.augment.apply(images.flatten(0, -3), draws.slice(start, start + len(idx)).flatten())
                images = flat.reshape(images.shape)
            x = images.unsqueeze(-3).to(torch.float32).mul_(self.scale)
            if self.shift:
                x.sub_(self.shift)
            yield x, take(self.labels, idx)


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
        first = self.loaders[0]
        if all(first.same_source(loader) for loader in self.loaders[1:]):
            # one gather per batch for all S orders (fewer kernel launches than S gathers and a stack)
            order = torch.stack([loader.sampler.indices() for loader in self.loaders], dim=1)  # (N, S)
            draws = [loader.epoch_draws() for loader in self.loaders]
            yield from first.batches(order, None if draws[0] is None else AugmentDraws.stack(draws))
            return
        for batches in zip(*self.loaders, strict=True):
            xs, ys = zip(*batches, strict=True)
            yield torch.stack(xs, dim=1), torch.stack(ys, dim=1)
