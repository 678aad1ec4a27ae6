"""The tensor loader's gather: advanced indexing ``images[idx]`` vs ``index_select`` (``batches.take``), side by side.

The training split as the tensor loader holds it (55 000 uint8 images of 28 × 28, random pixels; what is timed does
not depend on their values) and its labels (int64). For each batch size, one gather of a random batch of images and
of labels each way, interleaved in one process, medians of ``--rounds`` rounds; also, for scale, the float
conversion that follows the gather in every batch. Both ways give the same tensors (checked here on every batch
size before timing, and in ``tests/test_data.py``).

Usage:
    python benchmarks/gather.py [--rounds 5] [--batches 256 2048 16384] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import add_device_args, chosen_device, device_name, interleaved_times  # noqa: E402
from dropout_lab.batches import take  # noqa: E402

N_IMAGES = 55_000


def paths(device: torch.device, batch: int) -> dict[str, Callable[[], object]]:
    """Every timed call for one batch size, by row label."""
    gen = torch.Generator().manual_seed(batch)
    images = torch.randint(0, 256, (N_IMAGES, 28, 28), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, 10, (N_IMAGES,), generator=gen).to(device)
    idx = torch.randperm(N_IMAGES, generator=gen)[:batch].to(device)
    if not (torch.equal(images[idx], take(images, idx)) and torch.equal(labels[idx], take(labels, idx))):
        raise AssertionError("take differs from advanced indexing")
    return {
        f"batch {batch}: images[idx]": lambda: images[idx],
        f"batch {batch}: take(images, idx)": lambda: take(images, idx),
        f"batch {batch}: labels[idx]": lambda: labels[idx],
        f"batch {batch}: take(labels, idx)": lambda: take(labels, idx),
        f"batch {batch}: float conversion": lambda: images[:batch].unsqueeze(-3).to(torch.float32).mul_(1 / 255),
    }


def main() -> None:
    """Time every path interleaved and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--repeats", type=int, default=50, help="calls of each path per round")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 2048, 16384], help="batch sizes")
    add_device_args(parser)
    args = parser.parse_args()
    device = chosen_device(args)

    runs = {name: (run, args.repeats) for batch in args.batches for name, run in paths(device, batch).items()}
    times = {name: [t * 1e6 for t in ts] for name, ts in interleaved_times(runs, args.rounds).items()}

    print(f"\ndevice: {device_name(device)}; torch {torch.__version__}; median of {args.rounds} interleaved rounds\n")
    print("| path | µs | × take |")
    print("|---|---:|---:|")
    for name, values in times.items():
        base = name.replace("images[idx]", "take(images, idx)").replace("labels[idx]", "take(labels, idx)")
        ratio = f"{statistics.median(values) / statistics.median(times[base]):.2f}" if "idx" in name else "—"
        print(f"| {name} | {statistics.median(values):.1f} | {ratio} |")


if __name__ == "__main__":
    main()
