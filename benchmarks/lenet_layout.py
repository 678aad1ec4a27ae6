"""LeNet training-step time by memory layout and precision, and the cost of batch augmentation, side by side.

One step = forward, cross-entropy, backward and an Adam update of ``dropout_lab.models.LeNet`` (20/50 channels,
dense 500, its default dropout) on a batch of 256 random 28×28 images, five ways: fp32 with the default (contiguous,
NCHW) layout, fp32 with ``channels_last=True`` (NHWC), and each of those under bf16 autocast (what
``--trainer.precision bf16-mixed`` does); a fifth runs bf16/channels_last with PyTorch's own half-precision dropout
kernels, which round the scale 1/(1 − p) to bf16 (the project's layers avoid them; this prices that). The variants
run interleaved for ``--rounds`` rounds of ``--steps`` steps after a warm-up; the table shows the median ms per
step, the ratio to fp32/contiguous and the implied seconds per 55k-image epoch. A last line times ``data.hflip`` +
``data.max_shift 2`` on a batch of 256 uint8 images on the same device.

Usage:
    python benchmarks/lenet_layout.py [--rounds 5] [--steps 10] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dropout_lab.dropout as dropout_module  # noqa: E402
from benchmarks.speed import add_device_args, chosen_device, device_name  # noqa: E402
from dropout_lab.augment import BatchAugment  # noqa: E402
from dropout_lab.models import LeNet  # noqa: E402

BATCH, EPOCH_STEPS = 256, 215  # 55k training images / 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(channels_last: bool, bf16: bool, device: torch.device, torch_half_kernels: bool = False):
    """A closure doing one training step of a fresh LeNet with the given layout and precision.

    ``torch_half_kernels``: ``Dropout``/``Dropout2d`` call ``F.dropout``/``F.dropout2d`` also for bf16 input.
    """
    torch.manual_seed(0)
    model = LeNet(channels_last=channels_last).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(BATCH, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)

    def step() -> None:
        saved = dropout_module.HALF_DTYPES
        dropout_module.HALF_DTYPES = () if torch_half_kernels else saved  # read by the layers at each call
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finally:
            dropout_module.HALF_DTYPES = saved

    return step


def time_steps(step, steps: int, device: torch.device) -> float:
    """Milliseconds per call of ``step``, averaged over ``steps`` calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    """Time the five variants interleaved and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    add_device_args(parser)
    args = parser.parse_args()
    device = chosen_device(args)
    variants = {
        "fp32, contiguous (default)": (False, False),
        "fp32, channels_last": (True, False),
        "bf16 autocast, contiguous": (False, True),
        "bf16 autocast, channels_last": (True, True),
        "bf16 autocast, channels_last, PyTorch's bf16 dropout kernels (rounded scale)": (True, True, True),
    }
    steps = {name: make_step(*flags[:2], device, *flags[2:]) for name, flags in variants.items()}
    for step in steps.values():  # warm-up: allocator, oneDNN/cuDNN kernel choice
        time_steps(step, 3, device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(time_steps(step, args.steps, device))
    base = statistics.median(times["fp32, contiguous (default)"])
    print(
        f"device: {device_name(device)}; torch {torch.__version__}; batch {BATCH}; "
        f"{args.rounds} rounds × {args.steps} steps"
    )
    print("| variant | ms/step (median) | speed-up | s/epoch (215 steps) |\n|---|---|---|---|")
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"| {name} | {ms:.1f} | {base / ms:.2f}× | {ms * EPOCH_STEPS / 1000:.1f} |")
    augment = BatchAugment(hflip=True, max_shift=2)
    images = torch.randint(0, 256, (BATCH, 28, 28), dtype=torch.uint8, device=device)
    draws = augment.draw(BATCH, torch.Generator().manual_seed(0)).to(device)
    ms = statistics.median(time_steps(lambda: augment.apply(images, draws), 20, device) for _ in range(args.rounds))
    print(f"augmentation (hflip + max_shift 2) of one batch: {ms:.3f} ms ({ms / base * 100:.2f} % of a default step)")


if __name__ == "__main__":
    main()
