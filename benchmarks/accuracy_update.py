"""Time of one training-accuracy update: ``TopOneAccuracy`` vs torchmetrics' ``MulticlassAccuracy``, side by side.

The classifiers update their accuracy once per (micro-)batch, so on a launch-bound GPU its ops are part of every
step. Both metrics get the same (256, 10) logits; the variants alternate for ``--rounds`` rounds of ``--updates``
updates each (CUDA synchronized around each timed block) and the table shows the median µs per update and the
ratio.

Usage:
    python benchmarks/accuracy_update.py [--rounds 7] [--updates 2000] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import add_device_args, chosen_device, device_name  # noqa: E402

from dropout_lab.metrics import TopOneAccuracy  # noqa: E402


def time_updates(metric: Metric, logits: torch.Tensor, target: torch.Tensor, updates: int) -> float:
    """Microseconds per ``update`` over ``updates`` calls (the device synchronized at both ends)."""
    if logits.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(updates):
        metric.update(logits, target)
    if logits.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / updates * 1e6


def main() -> None:
    """Time both metrics interleaved and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    parser.add_argument("--updates", type=int, default=2000, help="updates per metric per round")
    add_device_args(parser)
    args = parser.parse_args()
    device = chosen_device(args)
    logits, target = torch.randn(256, 10, device=device), torch.randint(0, 10, (256,), device=device)
    metrics = {
        "TopOneAccuracy": TopOneAccuracy().to(device),
        "MulticlassAccuracy(average='micro', validate_args=False)": MulticlassAccuracy(
            10, average="micro", validate_args=False
        ).to(device),
    }
    times: dict[str, list[float]] = {name: [] for name in metrics}
    for metric in metrics.values():
        time_updates(metric, logits, target, 50)  # warm-up
    for _ in range(args.rounds):
        for name, metric in metrics.items():
            times[name].append(time_updates(metric, logits, target, args.updates))
    ours = statistics.median(times["TopOneAccuracy"])
    print(f"\naccuracy update, (256, 10) logits; median of {args.rounds} rounds × {args.updates} updates\n")
    print("| metric | µs / update | × TopOneAccuracy |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / ours:.2f} |")
    values = {name: metric.compute().item() for name, metric in metrics.items()}
    assert len(set(values.values())) == 1, values  # the same accuracy
    print(f"\ndevice: {device_name(device)}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
