"""Wall time of one study run one pair at a time vs ``--jobs N`` worker processes, side by side.

Runs ``python -m dropout_lab study --config <study> --seeds <seeds>`` once per ``--jobs`` value, each into its own
temporary output and log folder (nothing under ``results/`` is touched), one after the other, and prints the
wall time of each, the mean seconds per run from its ``results.csv``, the speed-up over the first value and the
test accuracies (which must agree across job counts up to thread-count rounding). Torch's default thread count
is left alone, so ``--jobs 1`` uses all cores in one process and ``--jobs N`` gives each worker 1/N of them.

Usage:
    python benchmarks/study_jobs.py [--study configs/studies/swap.yaml] [--seeds 0] [--jobs 1 2]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import device_name  # noqa: E402


def run(study: str, seeds: list[str], jobs: int, scratch: Path) -> tuple[float, list[dict[str, str]]]:
    """Run the study with ``jobs`` workers into ``scratch``; its wall time and its results rows."""
    out, logs = scratch / f"out_jobs{jobs}", scratch / f"logs_jobs{jobs}"
    cmd = [sys.executable, "-m", "dropout_lab", "study", "--config", study, "--seeds", *seeds]
    cmd += ["--jobs", str(jobs), "--out", str(out), "--logdir", str(logs)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with (out / "results.csv").open(newline="") as f:
        return wall, list(csv.DictReader(f))


def main() -> None:
    """Run the study once per job count and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="configs/studies/swap.yaml", help="the study file")
    parser.add_argument("--seeds", nargs="+", default=["0"], help="seeds to run (each job count runs them all)")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="job counts to compare")
    args = parser.parse_args()
    print(f"device: {device_name(torch.device('cpu'))} (torch default threads); study {args.study}, seeds {args.seeds}")
    print("| --jobs | wall s | runs | mean s/run | speed-up | mean test acc |\n|---|---|---|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for jobs in args.jobs:
            wall, rows = run(args.study, args.seeds, jobs, Path(tmp))
            base = base or wall
            per_run = statistics.mean(float(r["seconds"]) for r in rows)
            acc = statistics.mean(float(r["test_acc"]) for r in rows)
            print(f"| {jobs} | {wall:.1f} | {len(rows)} | {per_run:.1f} | {base / wall:.2f}× | {acc:.4f} |", flush=True)


if __name__ == "__main__":
    main()
