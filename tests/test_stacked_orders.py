"""Stacked training orders (``data.shuffle_seeds``): each PopulationMLP member trains on its own seed's data order."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from dropout_lab.augment import BatchAugment
from dropout_lab.batches import EpochPermutation, TensorBatchLoader
from dropout_lab.data import FashionMNISTDataModule, StackedBatchLoader
from dropout_lab.population import PopulationMLP


def module(data_dir: Path, **kwargs) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), val_size=100, batch_size=64, **kwargs)
    dm.setup("fit")
    return dm


def test_each_stacked_order_is_the_batches_of_a_run_with_that_seed(tv_data_dir: Path) -> None:
    """Order j of every batch equals the batches a single run with shuffle_seed = seed j gets, augmentation included."""
    seeds = [3, 5]
    augment = {"hflip": True, "max_shift": 2}
    stacked = module(tv_data_dir, shuffle_seeds=seeds, **augment).train_dataloader()
    singles = [module(tv_data_dir, shuffle_seed=s, **augment).train_dataloader() for s in seeds]
    assert isinstance(stacked, StackedBatchLoader) and len(stacked) == len(singles[0]) == 8  # 500 images / 64
    for epoch in (0, 1):
        stacked.sampler.set_epoch(epoch)  # what Lightning calls before each training epoch
        for single in singles:
            single.sampler.set_epoch(epoch)
        pairs = list(zip(stacked, *singles, strict=True))
        for (x, y), *alone in pairs:
            assert x.shape == (len(y), 2, 1, 28, 28) and y.shape == (len(y), 2)
            for j, (xs, ys) in enumerate(alone):
                assert torch.equal(x[:, j], xs) and torch.equal(y[:, j], ys)
        assert not torch.equal(pairs[0][0][1], pairs[0][0][0][1])  # seeds 3 and 5 draw different orders
    dm = module(tv_data_dir, shuffle_seeds=seeds)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,)  # evaluation batches are not stacked


@pytest.mark.parametrize("augment", [None, BatchAugment(hflip=True, max_shift=3)])
@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2)])
def test_one_gather_for_all_orders_gives_the_batches_of_stacking_them(augment, rank: int, world: int) -> None:
    """The fused path (one gather of an (N, S) order per batch) yields, bit for bit, the stack of S loaders' batches.

    The per-order fallback runs when the loaders do not share their tensors (here: equal copies), so both paths see
    the same images, orders and augmentation draws; 203 samples in batches of 50 leave a partial last batch.
    """
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (203, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (203,), generator=g)

    def loaders(copies: bool) -> list[TensorBatchLoader]:
        return [
            TensorBatchLoader(
                images.clone() if copies else images,
                labels.clone() if copies else labels,
                50,
                EpochPermutation(203, shuffle=True, seed=seed, rank=rank, world_size=world),
                mean=0.3,
                std=0.4,
                augment=augment,
            )
            for seed in (4, 8, 15)
        ]

    fused, fallback = StackedBatchLoader(loaders(False)), StackedBatchLoader(loaders(True))
    assert fused.loaders[0].same_source(fused.loaders[2]) and not fallback.loaders[0].same_source(fallback.loaders[1])
    for epoch in (0, 3):
        fused.sampler.set_epoch(epoch)
        fallback.sampler.set_epoch(epoch)
        pairs = list(zip(fused, fallback, strict=True))
        assert len(pairs) == len(fused) == (5 if world == 1 else 3)
        assert pairs[-1][0][0].shape == ((3 if world == 1 else 2), 3, 1, 28, 28)  # the partial last batch
        for (x, y), (x_ref, y_ref) in pairs:
            assert x.shape == x_ref.shape and torch.equal(x, x_ref) and torch.equal(y, y_ref)
        assert not torch.equal(pairs[0][0][0][:, 0], pairs[0][0][0][:, 1])  # the orders differ


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shuffle_seeds": [1, 2], "loader": "torch"}, "need loader: tensor"),
        ({"shuffle_seeds": []}, "at least one seed"),
        ({"shuffle_seeds": [1, 2], "shuffle_seed": 4}, "give one of them"),
    ],
)
def test_bad_shuffle_seeds_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FashionMNISTDataModule(**kwargs)


def test_member_j_of_every_cell_sees_order_j() -> None:
    pop = PopulationMLP((16,), [(0.0,), (0.0,)], members_per_cell=2, init_seeds=[7, 9])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 2, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (8, 2), generator=g)
    logits = pop(x)
    assert logits.shape == (4, 8, 10)
    for m in range(4):
        j = m % 2  # member c<cell>s<j>
        torch.testing.assert_close(logits[m], pop(x[:, j])[m], rtol=1e-6, atol=1e-6)
    losses = pop.member_losses(logits, y)
    for m in range(4):
        expected = torch.nn.functional.cross_entropy(logits[m], y[:, m % 2])
        torch.testing.assert_close(losses[m], expected)
    with pytest.raises(ValueError, match="needs one per member of a cell"):
        pop(torch.rand(8, 3, 1, 28, 28))


class _TrainingDevices(L.Callback):
    """The device types of the weights and of the batches seen in training steps."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.seen |= {pl_module.net[0].weight.device.type, batch[0].device.type, batch[1].device.type}


def _fit_population(data_dir: Path, batch_size: int, micro: int | None, accelerator: str = "cpu") -> PopulationMLP:
    """A 12-step fit; ``pop.training_devices``: the device types seen in its steps (Lightning moves the module
    back to the CPU when ``fit`` ends)."""
    L.seed_everything(3)
    pop = PopulationMLP((16,), [(0.5,), (0.0,)], members_per_cell=2, init_seeds=[3, 5], micro_batch_size=micro)
    dm = FashionMNISTDataModule(data_dir=str(data_dir), val_size=100, batch_size=batch_size, shuffle_seeds=[3, 5])
    devices = _TrainingDevices()
    trainer = L.Trainer(max_steps=12, accelerator=accelerator, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[devices])  # fmt: skip
    trainer.fit(pop, datamodule=dm)
    pop.training_devices = devices.seen
    return pop


def test_micro_batches_of_stacked_orders_make_the_same_updates(tv_data_dir: Path) -> None:
    """Batch 32 split into micro-batches of 8 = batch 8: the stacked batch is split along its first (batch) axis."""
    whole, split = _fit_population(tv_data_dir, 8, None), _fit_population(tv_data_dir, 32, 8)
    assert whole.training_devices == split.training_devices == {"cpu"}
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    start = PopulationMLP((16,), [(0.5,), (0.0,)], members_per_cell=2, init_seeds=[3, 5])
    assert not torch.allclose(start.net[0].weight, whole.net[0].weight)  # it trained


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_micro_batches_of_stacked_orders_make_the_same_updates(tv_data_dir: Path) -> None:
    """On CUDA (the set on the GPU, orders gathered there): batch 32 in micro-batches of 8 = batch 8."""
    whole, split = _fit_population(tv_data_dir, 8, None, "gpu"), _fit_population(tv_data_dir, 32, 8, "gpu")
    assert whole.training_devices == split.training_devices == {"cuda"}
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_report_knows_how_the_training_orders_were_chosen() -> None:
    from dropout_lab.study_population import _data_orders

    per_seed = {"data": {"shuffle_seeds": [0, 1]}}
    assert _data_orders(per_seed, []) == "per seed"
    assert _data_orders({"data": {"loader": "torch"}}, []) == "shared"
    assert _data_orders(per_seed, ["--data.shuffle_seeds", "null"]) == "set by the run's arguments"
