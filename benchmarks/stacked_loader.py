"""Time of one epoch of stacked training orders: one gather for all S orders vs S gathers and a stack, side by side.

``study --population`` feeds each member its seed's data order through
:class:`~dropout_lab.batches.StackedBatchLoader`. When the S per-seed loaders share their tensors (always, from the
DataModule) each batch is one gather of an (B, S) index, one augmentation and one float conversion; otherwise
(the per-order path) S loaders gather and convert their own batches and ``torch.stack`` joins them. Both paths
get the same images (60k random uint8 28×28 on the device), batch 256 and orders; the variants alternate for
``--rounds`` rounds of one epoch each (CUDA synchronized around each) and the table shows the median ms per epoch
and the ratio. The batches are checked equal.

Usage:
    python benchmarks/stacked_loader.py [--orders 3 24] [--augment] [--rounds 5] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import add_device_args, chosen_device, device_name  # noqa: E402

from dropout_lab.augment import BatchAugment  # noqa: E402
from dropout_lab.batches import EpochPermutation, StackedBatchLoader, TensorBatchLoader  # noqa: E402

N, BATCH = 60_000, 256


def stacked(images: torch.Tensor, labels: torch.Tensor, orders: int, shared: bool, augment: BatchAugment | None):
    """A StackedBatchLoader of ``orders`` seeds; ``shared=False`` gives each loader its own copy (per-order path)."""
    loaders = [
        TensorBatchLoader(
            images if shared else images.clone(),
            labels if shared else labels.clone(),
            BATCH,
            EpochPermutation(N, shuffle=True, seed=seed),
            mean=0.286,
            std=0.353,
            augment=augment,
        )
        for seed in range(orders)
    ]
    return StackedBatchLoader(loaders)


def epoch_ms(loader: StackedBatchLoader, device: torch.device) -> float:
    """Milliseconds to draw every batch of one epoch (the device synchronized at both ends)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in loader:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    """Time both paths interleaved for each number of orders and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, nargs="+", default=[3, 24], help="numbers of stacked orders S")
    parser.add_argument("--augment", action="store_true", help="with hflip and max_shift 2 (draws on every batch)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    add_device_args(parser)
    args = parser.parse_args()
    device = chosen_device(args)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 28, 28), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 10, (N,), generator=g).to(device)
    augment = BatchAugment(hflip=True, max_shift=2) if args.augment else None
    print(f"\none epoch of stacked orders ({N} images, batch {BATCH}, augment {'on' if augment else 'off'}); "
          f"median ms of {args.rounds} rounds\n")  # fmt: skip
    print("| orders S | one gather (ms) | S gathers + stack (ms) | speed-up |")
    print("|---|---|---|---|")
    for orders in args.orders:
        paths = {"fused": stacked(images, labels, orders, True, augment)}
        paths["per-order"] = stacked(images, labels, orders, False, augment)
        for (x, y), (x_ref, y_ref) in zip(*paths.values(), strict=True):  # warm-up, and the same batches
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, loader in paths.items():
                times[name].append(epoch_ms(loader, device))
        fused, per_order = (statistics.median(times[name]) for name in paths)
        print(f"| {orders} | {fused:.1f} | {per_order:.1f} | {per_order / fused:.2f}× |")
    print(f"\ndevice: {device_name(device)}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
