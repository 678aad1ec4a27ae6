"""The swap study's 21 d2l MLPs: one PopulationMLP vs 21 sequential DropoutMLP runs, side by side in one process.

Both paths go through the Trainer with the tensor loader (60k training images, ``val_size: 0``, batch 256,
784-256-256-10, SGD lr 0.1) and time the second epoch of a 2-epoch fit (steady state). The sequential path runs
``--singles`` single models (default 3) and scales their mean epoch to ``--members`` models; the ratio is
(members × single epoch) / population epoch, i.e. the speed-up of a study's training epochs. Rounds interleave
the two paths; the table shows medians. ``--precisions 32-true bf16-mixed`` times the population at each Trainer
precision (the single models always run at 32-true).

Usage:
    python benchmarks/population.py [--members 21] [--singles 3] [--rounds 2] [--data-dir data] [--device auto]
        [--threads N] [--precisions 32-true ...]

On a shared CPU, use ``--threads 1``: with more threads than free cores, OpenMP's spinning makes small
single-model steps many times slower than the population's large ones, and the ratio says nothing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dropout_lab.data import FashionMNISTDataModule  # noqa: E402
from dropout_lab.models import DropoutMLP  # noqa: E402
from dropout_lab.population import PopulationMLP  # noqa: E402
from dropout_lab.speed import EpochTimer  # noqa: E402

SWAP = [[0.5, 0.5], [0.3, 0.5], [0.5, 0.3], [0.1, 0.5], [0.5, 0.1], [0.1, 0.9], [0.0, 0.0]]


def epoch_time(model: L.LightningModule, data_dir: str, accelerator: str, precision: str = "32-true") -> float:
    """Second-epoch wall time of a 2-epoch fit."""
    timer = EpochTimer(log=False, verbose=False)
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, callbacks=[timer],
                        precision=precision)  # fmt: skip
    trainer.fit(model, FashionMNISTDataModule(data_dir=data_dir, val_size=0))
    return timer.epochs[-1].train_s


def main() -> None:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=21, help="population size (cells × seeds); default 21")
    parser.add_argument("--singles", type=int, default=3, help="single-model runs timed per round; default 3")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; default 2")
    parser.add_argument("--data-dir", default="data", help="FashionMNIST data_dir; default data")
    parser.add_argument("--device", default="auto", help="Trainer accelerator: auto, cpu or gpu; default auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["32-true"],
        help="Trainer precisions of the population path, e.g. 32-true bf16-mixed; default 32-true",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cells = [SWAP[i % len(SWAP)] for i in range(args.members)]
    pop_times: dict[str, list[float]] = {precision: [] for precision in args.precisions}
    single_times = []
    for _ in range(args.rounds):
        for precision, times in pop_times.items():
            L.seed_everything(0, verbose=False)
            population = PopulationMLP((256, 256), cells, members_per_cell=1)
            times.append(epoch_time(population, args.data_dir, args.device, precision))
        singles = [epoch_time(DropoutMLP(dropouts=cells[i]), args.data_dir, args.device) for i in range(args.singles)]
        single_times.append(statistics.mean(singles))
    single = statistics.median(single_times)
    device = torch.cuda.get_device_name(0) if args.device != "cpu" and torch.cuda.is_available() else "CPU"
    print(f"device: {device} ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}")
    print("| path | s/epoch | s per member-epoch | × sequential | rounds |\n|---|---|---|---|---|")
    print(f"| {args.members} × DropoutMLP, sequential (from {args.singles} timed) | {args.members * single:.2f} | "
          f"{single:.3f} | 1.00 | {', '.join(f'{t:.3f}' for t in single_times)} |")  # fmt: skip
    for precision, times in pop_times.items():
        pop = statistics.median(times)
        print(f"| PopulationMLP, {args.members} members, {precision} | {pop:.2f} | {pop / args.members:.3f} | "
              f"{args.members * single / pop:.2f} | {', '.join(f'{t:.3f}' for t in times)} |")  # fmt: skip


if __name__ == "__main__":
    main()
