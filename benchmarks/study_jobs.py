"""Wall time of one study: one pair at a time, with ``--jobs N`` worker processes, as one population; side by side.

Runs ``python -m dropout_lab study --config <study> --seeds <seeds>`` once per ``--jobs`` value (and, with
``--population``, once more as ``study --population``: every cell × seed as a member of one ``PopulationMLP``
fit), each into its own temporary output and log folder (nothing under ``results/`` is touched), one after the
other, and prints the wall time of each command, the mean seconds per run from its ``results.csv`` (for the
population: its wall share per member), the speed-up over the first route and the mean test accuracy. Job counts
must agree up to thread-count rounding; the population differs by seed noise (its members share one data order
and another initialization). Torch's default thread count is left alone, so ``--jobs 1`` uses all cores in one
process and ``--jobs N`` gives each worker 1/N of them. Arguments after ``--`` go to every run (e.g.
``-- --trainer.accelerator gpu``).

Usage:
    python benchmarks/study_jobs.py [--study configs/studies/swap.yaml] [--seeds 0] [--jobs 1 2] [--population]
        [-- FIT_ARGS...]
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


def run(study: str, seeds: list[str], route: list[str], scratch: Path, fit_args: list[str]) -> tuple[float, list]:
    """Run the study with the ``route`` options into a folder of ``scratch``; its wall time and its results rows."""
    name = "_".join(route).replace("-", "")
    out, logs = scratch / f"out_{name}", scratch / f"logs_{name}"
    cmd = [sys.executable, "-m", "dropout_lab", "study", "--config", study, "--seeds", *seeds, *route]
    cmd += ["--out", str(out), "--logdir", str(logs)]
    if fit_args:
        cmd += ["--", *fit_args]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with (out / "results.csv").open(newline="") as f:
        return wall, list(csv.DictReader(f))


def main() -> None:
    """Run the study once per route and print the comparison."""
    argv = sys.argv[1:]
    fit_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="configs/studies/swap.yaml", help="the study file")
    parser.add_argument("--seeds", nargs="+", default=["0"], help="seeds to run (each route runs them all)")
    parser.add_argument("--jobs", type=int, nargs="*", default=[1, 2], help="job counts to compare")
    parser.add_argument("--population", action="store_true", help="also run the study as one PopulationMLP fit")
    args = parser.parse_args(argv)
    routes = [["--jobs", str(jobs)] for jobs in args.jobs] + ([["--population"]] if args.population else [])
    if not routes:
        parser.error("nothing to compare: give --jobs values and/or --population")
    cuda = torch.cuda.is_available() and "cpu" not in " ".join(fit_args)
    device = device_name(torch.device("cuda" if cuda else "cpu"))
    print(f"device: {device} (torch default threads); study {args.study}, seeds {args.seeds}, fit args {fit_args}")
    print("| route | wall s | runs | mean s/run | speed-up | mean test acc |\n|---|---|---|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for route in routes:
            wall, rows = run(args.study, args.seeds, route, Path(tmp), fit_args)
            base = base or wall
            per_run = statistics.mean(float(r["seconds"]) for r in rows)
            acc = statistics.mean(float(r["test_acc"]) for r in rows)
            label = " ".join(route)
            cols = [label, f"{wall:.1f}", str(len(rows)), f"{per_run:.1f}", f"{base / wall:.2f}×", f"{acc:.4f}"]
            print(f"| {' | '.join(cols)} |", flush=True)


if __name__ == "__main__":
    main()
