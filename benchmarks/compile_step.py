"""One MLP training step, eager vs ``torch.compile``, with and without dropout, interleaved in one process.

A step is the forward, cross-entropy, backward and an SGD update of the d2l MLP (784-256-256-10, dropout p on both
hidden layers) on one fixed batch of 256 random images already on the device. The four variants (p ∈ {0, 0.5} ×
eager/compiled) are built and warmed up first (compilation, CUDA-graph recording), then timed in ``--rounds``
interleaved rounds of ``--steps`` steps; the table shows the median ms per step and what dropout adds.

Usage:
    python benchmarks/compile_step.py [--rounds 7] [--steps 50] [--mode default] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import add_device_args, chosen_device, device_name  # noqa: E402
from dropout_lab.dropout import Dropout  # noqa: E402
from dropout_lab.models import DropoutMLP  # noqa: E402


def make_step(p: float, mode: str | None, device: torch.device, uniform_masks: bool = False) -> Callable[[], None]:
    """A closure running one training step of a fresh MLP (compiled with ``mode`` unless None).

    With ``uniform_masks`` its dropout layers draw their masks as ``UniformDropoutMasks`` makes them.
    """
    torch.manual_seed(0)
    model = DropoutMLP(dropouts=(p, p)).to(device)
    for layer in model.modules():
        if isinstance(layer, Dropout):
            layer.uniform_masks = uniform_masks
    forward = torch.compile(model, mode=mode) if mode else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(256, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (256,), device=device)

    def step() -> None:
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    """Time the four variants interleaved and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=50, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per variant before the rounds")
    parser.add_argument("--mode", default="default", help="torch.compile mode (reduce-overhead: CUDA graphs)")
    add_device_args(parser)
    args = parser.parse_args()
    device = chosen_device(args)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    variants = {(p, mode): make_step(p, mode, device) for p in (0.0, 0.5) for mode in (None, args.mode)}
    for step in variants.values():
        for _ in range(args.warmup):
            step()
    times: dict[tuple[float, str | None], list[float]] = {key: [] for key in variants}
    for _ in range(args.rounds):
        for key, step in variants.items():
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            times[key].append((time.perf_counter() - start) / args.steps * 1e3)
    med = {key: statistics.median(t) for key, t in times.items()}

    print(f"device: {device_name(device)}; torch {torch.__version__}; median of {args.rounds} rounds × {args.steps}")
    print("\n| dropout p | eager ms/step | compiled ms/step | compiled / eager | rounds (eager; compiled) |")
    print("|---|---|---|---|---|")
    for p in (0.0, 0.5):
        eager, comp = med[(p, None)], med[(p, args.mode)]
        rounds = "; ".join(", ".join(f"{t:.2f}" for t in times[(p, mode)]) for mode in (None, args.mode))
        print(f"| {p} | {eager:.3f} | {comp:.3f} | {comp / eager:.2f} | {rounds} |")
    added_eager = med[(0.5, None)] - med[(0.0, None)]
    added_comp = med[(0.5, args.mode)] - med[(0.0, args.mode)]
    print(f"\ndropout adds {added_eager:.3f} ms/step eager, {added_comp:.3f} ms/step compiled ({args.mode})")


if __name__ == "__main__":
    main()
