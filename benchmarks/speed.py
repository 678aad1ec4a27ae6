"""One-epoch time of the d2l MLP three ways, side by side in one process.

(a) the Trainer with ``loader: torch`` (torchvision ``Dataset`` + ``DataLoader``), (b) the Trainer with
``loader: tensor`` (the default), (c) a bare PyTorch loop over device-resident tensors (the floor). One epoch =
60k training images (``val_size: 0``), batch 256, 784-256-256-10 ReLU MLP with dropout 0.5/0.5, SGD lr 0.1.
The paths run interleaved for ``--rounds`` rounds; each round times the second epoch of a 2-epoch run
(steady state), and the table shows the median. Also measured: the peak RSS of a CPU ``fit`` through the CLI.

Usage:
    python benchmarks/speed.py [--rounds 3] [--data-dir data] [--device auto] [--skip-torch-loader]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dropout_lab.data import FashionMNISTDataModule  # noqa: E402
from dropout_lab.idx import find_or_install, load_arrays  # noqa: E402
from dropout_lab.models import DropoutMLP  # noqa: E402


class EpochTimer(L.Callback):
    """Records the wall time of every training epoch (synchronizing CUDA at both ends)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync()
        self.times.append(time.perf_counter() - self.start)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def trainer_epoch(loader: str, data_dir: str, accelerator: str) -> float:
    """Second-epoch time of a 2-epoch fit through the Trainer, as ``configs/mlp.yaml`` runs it."""
    L.seed_everything(0, verbose=False)
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[timer],
        log_every_n_steps=50,
    )
    data = FashionMNISTDataModule(data_dir=data_dir, val_size=0, loader=loader)
    trainer.fit(DropoutMLP(), data)
    return timer.times[-1]


def bare_epoch(data_dir: str, device: torch.device) -> float:
    """Second-epoch time of a plain PyTorch loop over uint8 tensors on the device (the floor)."""
    torch.manual_seed(0)
    arrays = load_arrays(find_or_install(data_dir))
    images, labels = arrays.train_images.to(device), arrays.train_labels.long().to(device)
    net = DropoutMLP().net.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for _ in range(2):
        _sync()
        start = time.perf_counter()
        for idx in torch.randperm(len(labels), device=device).split(256):
            x = images[idx].unsqueeze(1).to(torch.float32).mul_(1 / 255)
            loss = loss_fn(net(x), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _sync()
        times.append(time.perf_counter() - start)
    return times[-1]


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
    done = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True, env=env)
    shutil.rmtree(tmp, ignore_errors=True)
    line = [x for x in done.stderr.splitlines() if x.startswith("PEAK_RSS_KB")][-1]
    return float(line.split()[1]) / 1024


def device_name(device: torch.device) -> str:
    """A readable name of the device the benchmark ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    """Run the three paths interleaved and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--data-dir", default=str(ROOT / "data"), help="FashionMNIST folder (torchvision layout)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"], help="where to run")
    parser.add_argument("--skip-torch-loader", action="store_true", help="skip path (a), the slowest")
    args = parser.parse_args()
    use_gpu = args.device == "gpu" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_gpu else "cpu")
    accelerator = "gpu" if use_gpu else "cpu"
    find_or_install(args.data_dir)

    paths = {
        "(c) bare loop, device tensors": lambda: bare_epoch(args.data_dir, device),
        "(b) Trainer, loader: tensor": lambda: trainer_epoch("tensor", args.data_dir, accelerator),
    }
    if not args.skip_torch_loader:
        paths["(a) Trainer, loader: torch (0 workers)"] = lambda: trainer_epoch("torch", args.data_dir, accelerator)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(args.rounds):
        for name, run in paths.items():
            times[name].append(run())
            print(f"round {r + 1}/{args.rounds}  {name}: {times[name][-1]:.3f} s", file=sys.stderr)
    med = {name: statistics.median(t) for name, t in times.items()}
    rss = cli_fit_peak_rss_mb(args.data_dir, accelerator)

    print(f"\ndevice: {device_name(device)}; torch {torch.__version__}, lightning {L.__version__}")
    print(f"one epoch = 60k images, batch 256, d2l MLP; median of {args.rounds} interleaved rounds\n")
    print("| path | s/epoch (median) | all rounds |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {med[name]:.3f} | {', '.join(f'{v:.3f}' for v in t)} |")
    b, c = med["(b) Trainer, loader: tensor"], med["(c) bare loop, device tensors"]
    print(f"\nratio b/c (Trainer+tensor loader over bare loop): {b / c:.3f}")
    if not args.skip_torch_loader:
        print(
            f"ratio a/b (torch DataLoader over tensor loader): {med['(a) Trainer, loader: torch (0 workers)'] / b:.2f}"
        )
    print(f"peak RSS of a 1-epoch CPU fit through the CLI: {rss:.0f} MB")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this benchmark process (all paths): {own:.0f} MB")


if __name__ == "__main__":
    main()
