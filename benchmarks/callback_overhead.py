"""Cost of ``ActivationVarianceMonitor(every_n_steps=50)`` on one epoch of the d2l MLP, side by side in one process.

One epoch = 60k training images (``val_size: 0``), batch 256, ``DropoutMLP`` with its defaults (784-256-256-10,
ReLU, dropout 0.5/0.5, SGD lr 0.1), through ``lightning.Trainer`` with the ``FashionMNISTDataModule`` (tensor
loader) and a TensorBoard logger in a temporary folder. The two variants (without / with the monitor) run
interleaved for ``--rounds`` rounds; each round times the second epoch of a 2-epoch fit (steady state), and the
medians of wall time and of this process's CPU time are compared. Because wall-clock epochs on a shared machine
are noisy, the monitor also times its own code (hooks and callbacks) inside the timed epoch, which measures its
cost directly. The one-off work at the end
of training (flush, figure, TensorBoard image) is timed separately: it is not part of any epoch.

On a CPU shared with other jobs, pass ``--threads 1``: with more intra-op threads than free cores, the epochs
thrash (seen here: 10-86 s per epoch with 2 threads vs ~2.3 s with 1) and no percentage means anything.

Usage:
    python benchmarks/callback_overhead.py [--rounds 3] [--data-dir data] [--device auto] [--every-n-steps 50]
        [--threads N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import add_device_args, chosen_device, device_name  # noqa: E402
from dropout_lab.callbacks import ActivationVarianceMonitor  # noqa: E402
from dropout_lab.data import FashionMNISTDataModule  # noqa: E402
from dropout_lab.idx import find_or_install  # noqa: E402
from dropout_lab.models import DropoutMLP  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class EpochClock(L.Callback):
    """Wall time (CUDA synchronized at both ends) and this process's CPU time of every training epoch.

    The CPU time barely notices other processes competing for the cores, so it is the steadier number on a
    shared machine (with ``--threads 1`` it is the work done; more threads add their spin-waits to it).
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync()
        self.start = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync()
        self.wall.append(time.perf_counter() - self.start[0])
        self.cpu.append(time.process_time() - self.start[1])


class TimedMonitor(ActivationVarianceMonitor):
    """The monitor, adding up the wall time spent in its own code (hooks, batch and epoch callbacks) per epoch.

    On the CPU the hooks' kernels run inside that time; on a GPU it is the host-side (launch) cost.
    """

    def __init__(self, every_n_steps: int) -> None:
        super().__init__(every_n_steps=every_n_steps)
        self.spent: list[float] = []
        self.train_end = 0.0

    def _timed(self, method, *args) -> None:
        start = time.perf_counter()
        method(*args)
        if self.spent:
            self.spent[-1] += time.perf_counter() - start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.spent.append(0.0)

    def _hook(self, *args) -> None:
        self._timed(super()._hook, *args)

    def on_train_batch_start(self, *args) -> None:
        self._timed(super().on_train_batch_start, *args)

    def on_train_batch_end(self, *args) -> None:
        self._timed(super().on_train_batch_end, *args)

    def on_train_epoch_end(self, *args) -> None:
        self._timed(super().on_train_epoch_end, *args)

    def on_train_end(self, *args) -> None:
        start = time.perf_counter()
        super().on_train_end(*args)
        self.train_end = time.perf_counter() - start


def fit(data_dir: str, accelerator: str, monitor_every: int | None) -> tuple[EpochClock, TimedMonitor | None]:
    """A 2-epoch fit (the second epoch is the steady state that is compared)."""
    L.seed_everything(0, verbose=False)
    clock = EpochClock()
    monitor = TimedMonitor(every_n_steps=monitor_every) if monitor_every is not None else None
    log_root = tempfile.mkdtemp(prefix="dropout_lab_cb_bench_")
    try:
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            max_epochs=2,
            logger=TensorBoardLogger(log_root, name="bench"),
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            callbacks=[clock] if monitor is None else [clock, monitor],
            log_every_n_steps=50,
        )
        trainer.fit(DropoutMLP(), FashionMNISTDataModule(data_dir=data_dir, val_size=0))
    finally:
        shutil.rmtree(log_root, ignore_errors=True)
    return clock, monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--data-dir", default=str(ROOT / "data"), help="FashionMNIST folder (torchvision layout)")
    parser.add_argument("--every-n-steps", type=int, default=50, help="the monitor's recording interval")
    add_device_args(parser)
    args = parser.parse_args()
    device = chosen_device(args)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    find_or_install(args.data_dir)

    variants = {"without monitor": None, f"with monitor (every_n_steps={args.every_n_steps})": args.every_n_steps}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    own: list[float] = []
    train_end: list[float] = []
    points = 0
    for r in range(args.rounds):
        order = list(variants.items())
        if r % 2:
            order.reverse()  # alternate which variant goes first
        for name, every in order:
            clock, monitor = fit(args.data_dir, accelerator, every)
            wall[name].append(clock.wall[-1])
            cpu[name].append(clock.cpu[-1])
            if monitor is not None:
                own.append(monitor.spent[-1] / clock.wall[-1])
                train_end.append(monitor.train_end)
                points = sum(len(v) for v in monitor.history.values())
            print(
                f"round {r + 1}/{args.rounds}  {name}: {clock.wall[-1]:.3f} s wall, {clock.cpu[-1]:.3f} s CPU",
                file=sys.stderr,
            )
    base, with_monitor = variants

    print(f"\ndevice: {device_name(device)}; torch {torch.__version__}, lightning {L.__version__}")
    print(f"one epoch = 60k images, batch 256, DropoutMLP defaults; median of {args.rounds} interleaved rounds\n")
    print("| variant | wall s/epoch (median) | all rounds | CPU s/epoch (median) | all rounds |")
    print("|---|---|---|---|---|")
    for name in variants:
        print(
            f"| {name} | {statistics.median(wall[name]):.3f} | {', '.join(f'{v:.3f}' for v in wall[name])} "
            f"| {statistics.median(cpu[name]):.3f} | {', '.join(f'{v:.3f}' for v in cpu[name])} |"
        )
    print()
    for label, table in (("wall", wall), ("CPU", cpu)):
        ratio = statistics.median(table[with_monitor]) / statistics.median(table[base])
        print(f"overhead ({label} time, medians): {100 * (ratio - 1):+.1f} % (target <= 5 %)")
    print(
        f"time inside the monitor's own code (hooks + callbacks) in the timed epoch: median "
        f"{100 * statistics.median(own):.2f} % of the epoch (rounds: {', '.join(f'{100 * v:.2f}' for v in own)})"
    )
    print(f"recorded points per fit (layers x recording steps): {points}")
    print(f"one-off cost at train end (flush + figure + TensorBoard image): {statistics.median(train_end):.3f} s")


if __name__ == "__main__":
    main()
