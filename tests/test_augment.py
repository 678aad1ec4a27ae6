"""Training augmentation: exact flips and translations, their distribution, and where they are (not) applied."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dropout_lab.augment import AugmentDraws, BatchAugment
from dropout_lab.data import EpochPermutation, FashionMNISTDataModule, TensorBatchLoader
from dropout_lab.models import LeNet


def naive_shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[i, j] = image[i + dy, j + dx] where that pixel exists, else 0 (a loop, for reference)."""
    h, w = image.shape
    out = torch.zeros_like(image)
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[i, j] = image[i + dy, j + dx]
    return out


def test_flip_and_shift_are_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 28, 28), generator=gen, dtype=torch.uint8)
    flips = torch.tensor([True, False, True, False, True, False])
    shifts = torch.tensor([[0, 0], [3, -2], [-3, 3], [1, 0], [0, -1], [-2, -3]])
    out = BatchAugment(hflip=True, max_shift=3).apply(images, AugmentDraws(flips, shifts))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for k in range(6):
        source = images[k].flip(-1) if flips[k] else images[k]
        assert torch.equal(out[k], naive_shift(source, *shifts[k].tolist())), k


def test_draws_have_the_stated_distribution() -> None:
    n, s = 20_000, 2
    draws = BatchAugment(hflip=True, max_shift=s).draw(n, torch.Generator().manual_seed(1))
    p = draws.flips.double().mean().item()
    assert abs(p - 0.5) < 4 * (0.25 / n) ** 0.5  # within 4 standard errors of 1/2
    counts = torch.stack([(draws.shifts == v).sum(0) for v in range(-s, s + 1)]).double()  # (5, 2)
    expected = n / (2 * s + 1)
    chi2 = ((counts - expected) ** 2 / expected).sum(0)  # per axis, 4 degrees of freedom
    assert (chi2 < 18.5).all(), chi2  # the 0.1 % tail of chi² with 4 d.o.f. is 18.47
    assert draws.shifts.min() == -s and draws.shifts.max() == s


def test_off_by_default_and_range_checked() -> None:
    assert not BatchAugment().active
    with pytest.raises(ValueError, match=r"^data\.max_shift"):
        BatchAugment(max_shift=15)


def loader(images: torch.Tensor, augment: BatchAugment | None, seed: int = 0) -> TensorBatchLoader:
    sampler = EpochPermutation(len(images), shuffle=True, seed=seed)
    return TensorBatchLoader(images, torch.arange(len(images)), 64, sampler, augment=augment)


def test_loader_augments_per_sample_and_repeats_per_epoch() -> None:
    images = torch.randint(0, 256, (200, 28, 28), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    augment = BatchAugment(hflip=True, max_shift=2)
    aug, plain = loader(images, augment), loader(images, None)

    def epoch(ld: TensorBatchLoader, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        ld.sampler.set_epoch(e)
        x, y = (torch.cat(t) for t in zip(*ld, strict=True))
        return x, y

    x0, y0 = epoch(aug, 0)
    px, py = epoch(plain, 0)
    assert torch.equal(y0, py)  # augmentation leaves the order (and labels) alone
    draws = augment.draw(200, aug.sampler.generator(stream=1))
    expected = augment.apply(images[y0], draws).unsqueeze(1).float() / 255
    assert torch.allclose(x0, expected)
    x0_again, _ = epoch(aug, 0)
    assert torch.equal(x0, x0_again)  # a function of (seed, epoch) only: a resumed epoch is the same
    changed = (x0 != px).flatten(1).any(1).double().mean().item()
    # P(no flip and no shift) = 1/2 · 1/25 = 0.02; ≈ 0.02 more are unchanged by chance → far above 0.9
    assert changed > 0.9


def test_datamodule_augments_training_only(tv_data_dir: Path) -> None:
    kwargs = {"data_dir": str(tv_data_dir), "val_size": 100, "batch_size": 64}
    aug = FashionMNISTDataModule(**kwargs, hflip=True, max_shift=2)
    plain = FashionMNISTDataModule(**kwargs)
    for dm in (aug, plain):
        dm.setup("fit")
    for split in ("val", "test"):
        a, b = (torch.cat([x for x, _ in getattr(dm, f"{split}_dataloader")()]) for dm in (aug, plain))
        assert torch.equal(a, b), split
    a, b = (torch.cat([x for x, _ in dm.train_dataloader()]) for dm in (aug, plain))
    assert not torch.equal(a, b)


def test_torch_loader_gets_the_same_augmentations(tv_data_dir: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(tv_data_dir), val_size=100, loader="torch", hflip=True, max_shift=2)
    dm.setup("fit")
    names = [type(t).__name__ for t in dm.train_dataloader().dataset.dataset.transform.transforms]
    assert names[:2] == ["RandomHorizontalFlip", "RandomCrop"]
    assert dm.train_dataloader().dataset.dataset.transform.transforms[1].padding == 2
    val_names = [type(t).__name__ for t in dm.val_dataloader().dataset.dataset.transform.transforms]
    assert val_names == ["ToTensor", "Normalize"]


def test_lenet_channels_last_computes_the_same_logits() -> None:
    torch.manual_seed(0)
    plain = LeNet()
    fast = LeNet(channels_last=True)
    fast.load_state_dict(plain.state_dict())
    assert fast.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(32, 1, 28, 28)
    plain.eval(), fast.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), fast(x), atol=1e-5)
