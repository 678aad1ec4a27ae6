"""Seconds per training epoch of the d2l MLP or LeNet along every training path, side by side in one process.

Paths (one epoch = 60k training images, ``val_size: 0``, batch 256, SGD lr 0.1; the MLP is 784-256-256-10 ReLU
with dropout 0.5/0.5, LeNet the project's default 20/50 LeNet; ``tiny`` is a 784-8-10 MLP whose arithmetic is
negligible, so its table shows what each path costs per step beyond the math, as on a launch-bound GPU):

* ``trainer, DataLoader(w)``: the Trainer with ``loader: torch`` (torchvision ``Dataset`` + ``DataLoader`` with
  ``w`` workers);
* ``trainer, tensor loader``: the Trainer with the default device-resident ``loader: tensor``;
* ``+ barebones``: the same with ``Trainer(barebones=True)`` (no logging, checkpoints or progress bar);
* ``+ micro-batches K``: ``data.batch_size = 256·K`` and ``model.micro_batch_size = 256`` (the same updates,
  one Lightning step per K optimizer steps; each optimizer step a ``DirectSteps`` step), and ``+ lightning
  dispatch``: the same through ``manual_backward`` and ``LightningOptimizer.step`` (``direct_steps = False``);
* ``+ compile(mode)``: the ``CompileModule`` callback; ``+ fused``: ``SGD(fused=True)``;
* ``+ uniform masks``: the ``UniformDropoutMasks`` callback (CPU only: dropout masks drawn as ``uniform > p``);
* ``+ advanced indexing``: the tensor loader gathering each batch as ``images[idx]`` instead of ``index_select``
  (``batches.take``), as it did before; the same batches, slower on the CPU (``benchmarks/gather.py``);
* ``bare loop``: a plain PyTorch loop over device-resident tensors, eager, and compiled + fused (the floor);
  batches gathered with ``take`` as the tensor loader does, and for comparison with advanced indexing.

The paths run interleaved for ``--rounds`` rounds; each round times the last epoch of an ``--epochs``-epoch run
(steady state: compilation and CUDA-graph recording happen in the first epoch), and the table shows the median
and the ratio to the bare eager loop. ``--batches N`` times only the first N steps of each epoch and scales to a
full epoch (for LeNet on a CPU). With ``--rss`` it also measures the peak RSS of a 1-epoch ``fit`` through the CLI.

Usage:
    python benchmarks/speed.py [--model mlp|lenet|tiny] [--rounds 3] [--device auto] [--paths NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dropout_lab import batches  # noqa: E402
from dropout_lab.batches import take  # noqa: E402
from dropout_lab.classifier import ClassifierModule  # noqa: E402
from dropout_lab.data import FashionMNISTDataModule  # noqa: E402
from dropout_lab.idx import find_or_install, load_arrays  # noqa: E402
from dropout_lab.models import DropoutMLP, LeNet  # noqa: E402
from dropout_lab.speed import CompileModule, EpochTimer, UniformDropoutMasks  # noqa: E402

BATCH, N_TRAIN = 256, 60_000


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_model(kind: str, fused: bool = False, micro_batch_size: int | None = None) -> ClassifierModule:
    """The benchmarked model with SGD lr 0.1 (``fused``: the single-kernel implementation)."""

    def sgd(params: object) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=0.1, fused=fused or None)

    if kind == "tiny":  # almost no arithmetic: what is left is each path's per-step overhead
        return DropoutMLP(hidden_sizes=(8,), dropouts=(0.5,), optimizer=sgd, micro_batch_size=micro_batch_size)
    cls = DropoutMLP if kind == "mlp" else LeNet
    return cls(optimizer=sgd, micro_batch_size=micro_batch_size)


@dataclass(frozen=True)
class TrainerPath:
    """One way of running ``Trainer.fit``."""

    loader: str = "tensor"
    workers: int = 0
    barebones: bool = False
    micro: int = 1
    compile: str | None = None
    fused: bool = False
    uniform: bool = False
    dispatch: bool = False
    indexing: bool = False

    def name(self) -> str:
        """Row label of the table."""
        base = f"trainer, DataLoader({self.workers} workers)" if self.loader == "torch" else "trainer, tensor loader"
        extras = [
            "barebones" if self.barebones else "",
            f"micro-batches {self.micro}" if self.micro > 1 else "",
            f"compile({self.compile})" if self.compile else "",
            "fused" if self.fused else "",
            "uniform masks" if self.uniform else "",
            "lightning dispatch" if self.dispatch else "",
            "advanced indexing" if self.indexing else "",
        ]
        return " + ".join([base, *[e for e in extras if e]])

    def run(self, args: argparse.Namespace, accelerator: str) -> float:
        """Steady-epoch seconds of a ``--epochs``-epoch fit, scaled to a full epoch."""
        torch._dynamo.reset()  # every compiled path starts from an empty cache (no recompile limit carried over)
        L.seed_everything(0, verbose=False)
        timer = EpochTimer(log=False, verbose=False)
        switches = {} if self.barebones else {"logger": False, "enable_checkpointing": False}
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            max_epochs=args.epochs,
            barebones=self.barebones,
            enable_model_summary=False,
            enable_progress_bar=False,
            callbacks=[
                timer,
                *([CompileModule(mode=self.compile)] if self.compile else []),
                *([UniformDropoutMasks()] if self.uniform else []),
            ],
            limit_train_batches=math.ceil(args.batches / self.micro) if args.batches else None,
            **switches,
        )
        micro = BATCH if self.micro > 1 else None
        data = FashionMNISTDataModule(
            data_dir=args.data_dir, val_size=0, loader=self.loader, batch_size=BATCH * self.micro,
            num_workers=self.workers,
        )  # fmt: skip
        model = make_model(args.model, self.fused, micro)
        model.direct_steps = not self.dispatch
        with mock.patch.object(batches, "take", advanced_indexing) if self.indexing else contextlib.nullcontext():
            trainer.fit(model, data)
        steps = trainer.num_training_batches * self.micro
        return timer.epochs[-1].train_s * math.ceil(N_TRAIN / BATCH) / min(steps, math.ceil(N_TRAIN / BATCH))


def advanced_indexing(source: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The gather the tensor loader used before ``batches.take``: ``source[idx]``."""
    return source[idx]


def bare_epoch(
    args: argparse.Namespace,
    device: torch.device,
    compile_mode: str | None,
    fused: bool,
    gather: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = take,
) -> float:
    """Last-epoch seconds of a plain loop over uint8 tensors on the device (eager, or compiled + fused)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    arrays = load_arrays(find_or_install(args.data_dir))
    images, labels = arrays.train_images.to(device), arrays.train_labels.long().to(device)
    model = make_model(args.model).to(device)
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    if compile_mode:
        forward = torch.compile(model, mode=compile_mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=fused or None)
    loss_fn = torch.nn.CrossEntropyLoss()
    steps = args.batches or math.ceil(N_TRAIN / BATCH)
    times = []
    for _ in range(args.epochs):
        _sync()
        start = time.perf_counter()
        for idx in torch.randperm(len(labels), device=device).split(BATCH)[:steps]:
            x = gather(images, idx).unsqueeze(1).to(torch.float32).mul_(1 / 255)
            loss = loss_fn(forward(x), gather(labels, idx))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _sync()
        times.append(time.perf_counter() - start)
    return times[-1] * math.ceil(N_TRAIN / BATCH) / steps


_CHILD = """
import runpy, sys
sys.argv = ["dropout_lab", *sys.argv[1:]]
try:
    runpy.run_module("dropout_lab", run_name="__main__")
finally:
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")]
    print("PEAK_RSS_KB", hwm[0].split()[1] if hwm else "nan", file=sys.stderr)
"""


def cli_fit_peak_rss_mb(data_dir: str, accelerator: str) -> float:
    """Peak RSS (MB) of ``python -m dropout_lab fit --config configs/mlp.yaml`` for one epoch.

    Read from the child's own ``VmHWM`` (``ru_maxrss`` of a child would include the parent's memory it was
    forked from).
    """
    tmp = tempfile.mkdtemp(prefix="dropout_lab_bench_")
    cmd = [
        sys.executable, "-c", _CHILD, "fit", "--config", str(ROOT / "configs/mlp.yaml"),
        "--trainer.max_epochs", "1", "--trainer.accelerator", accelerator, "--data.data_dir", data_dir,
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", tmp,
        "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, check=True, cwd=tmp, capture_output=True, text=True, env=env)
    shutil.rmtree(tmp, ignore_errors=True)
    line = [x for x in done.stderr.splitlines() if x.startswith("PEAK_RSS_KB")][-1]
    return float(line.split()[1]) / 1024


def add_device_args(parser: argparse.ArgumentParser, threads: bool = True) -> None:
    """The benchmarks' shared ``--device`` (and ``--threads``) options."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"], help="where to run")
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def chosen_device(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` (if given) and resolve ``--device`` (auto: CUDA when available)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    use_gpu = args.device == "gpu" or (args.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_gpu else "cpu")


def interleaved_times(
    runs: dict[str, tuple[Callable[[], object], int]], rounds: int, progress: bool = False
) -> dict[str, list[float]]:
    """Seconds per call of each ``run``, called ``repeats`` times per round: ``{name: (run, repeats)}``.

    Every round calls the runs in order, CUDA (when present) synchronized around each timed block; a first round
    warms up and is not kept, so each list holds ``rounds`` values. ``progress``: a line on stderr after each round.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds + 1):
        for name, (run, repeats) in runs.items():
            _sync()
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            _sync()
            if r:
                times[name].append((time.perf_counter() - start) / repeats)
        if r and progress:
            print(f"round {r}/{rounds} done", file=sys.stderr)
    return times


def device_name(device: torch.device) -> str:
    """A readable name of the device the benchmark ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def build_paths(args: argparse.Namespace, device: torch.device, accelerator: str) -> dict[str, Callable[[], float]]:
    """Every path of the table, by row label."""
    graphs = "reduce-overhead" if device.type == "cuda" else "default"  # CUDA graphs exist only on the GPU
    trainer_paths = [
        *(TrainerPath(loader="torch", workers=w) for w in args.workers),
        TrainerPath(),
        TrainerPath(barebones=True),
        TrainerPath(micro=args.micro),
        TrainerPath(micro=args.micro, dispatch=True),
        TrainerPath(micro=args.micro, indexing=True),
        TrainerPath(compile=graphs, fused=True),
        TrainerPath(micro=args.micro, compile=graphs, fused=True),
    ]
    if device.type == "cpu":  # UniformDropoutMasks acts on the CPU only
        trainer_paths += [TrainerPath(uniform=True), TrainerPath(micro=args.micro, uniform=True)]
    paths: dict[str, Callable[[], float]] = {p.name(): (lambda p=p: p.run(args, accelerator)) for p in trainer_paths}
    paths["bare loop, eager"] = lambda: bare_epoch(args, device, None, False)
    paths["bare loop, eager, advanced indexing"] = lambda: bare_epoch(args, device, None, False, advanced_indexing)
    paths[f"bare loop + compile({graphs}) + fused"] = lambda: bare_epoch(args, device, graphs, True)
    if args.paths:
        unknown = [name for name in args.paths if name not in paths]
        if unknown:
            raise SystemExit(f"--paths: unknown {unknown}; choose from {list(paths)}")
        paths = {name: paths[name] for name in args.paths}
    return paths


def main() -> None:
    """Run the paths interleaved and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=["mlp", "lenet", "tiny"],
        default="mlp",
        help="which network to train (tiny: 784-8-10 with dropout 0.5, so the table shows per-step overhead)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is timed")
    parser.add_argument("--batches", type=int, default=0, help="time only this many steps per epoch (0 = all)")
    parser.add_argument("--micro", type=int, default=8, help="K of the micro-batch paths (optimizer steps per step)")
    parser.add_argument("--workers", type=int, nargs="*", default=[0], help="DataLoader paths' worker counts")
    parser.add_argument("--paths", nargs="*", help="run only these rows (by label)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"), help="FashionMNIST folder (torchvision layout)")
    add_device_args(parser, threads=False)
    parser.add_argument("--rss", action="store_true", help="also measure the peak RSS of a 1-epoch CLI fit")
    args = parser.parse_args()
    device = chosen_device(args)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    find_or_install(args.data_dir)

    paths = build_paths(args, device, accelerator)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(args.rounds):
        for name, run in paths.items():
            times[name].append(run())
            print(f"round {r + 1}/{args.rounds}  {name}: {times[name][-1]:.3f} s", file=sys.stderr, flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}

    print(f"\ndevice: {device_name(device)}; torch {torch.__version__}, lightning {L.__version__}")
    scope = f"first {args.batches} steps of each epoch, scaled to 235" if args.batches else "whole epoch"
    print(
        f"{args.model}: one epoch = 60k images, batch {BATCH}; last of {args.epochs} epochs ({scope}); "
        f"median of {args.rounds} interleaved rounds\n"
    )
    floor = med.get("bare loop, eager")
    steps = math.ceil(N_TRAIN / BATCH)
    print("| path | s/epoch (median) | ms/step | × bare eager loop | all rounds |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        ratio = f"{med[name] / floor:.2f}" if floor else "–"
        rounds = ", ".join(f"{v:.3f}" for v in t)
        print(f"| {name} | {med[name]:.3f} | {med[name] / steps * 1e3:.2f} | {ratio} | {rounds} |")
    if args.rss:
        print(f"\npeak RSS of a 1-epoch fit through the CLI: {cli_fit_peak_rss_mb(args.data_dir, accelerator):.0f} MB")


if __name__ == "__main__":
    main()
