"""Microseconds of one micro-batch's backward + optimizer step: Lightning's dispatch, ``DirectSteps``, bare PyTorch.

With ``model.micro_batch_size`` every optimizer step is a backward and a step inside one Lightning step. Three
routes for them run side by side in one ``Trainer.fit``, interleaved, on the same micro-batches of the 784-8-10
MLP of ``speed.py --model tiny`` (its arithmetic is negligible, so what differs is Python):

* ``lightning dispatch``: ``manual_backward(loss)`` + ``LightningOptimizer.step()`` (``direct_steps = False``);
* ``DirectSteps``: the project's default (:mod:`dropout_lab.steps`): the same hooks, ops and step count;
* ``bare``: ``loss.backward()`` + ``optimizer.step()`` on the torch optimizer, no hooks and no step count (the
  floor; not a usable route in a Trainer).

The forward and ``zero_grad`` run outside the timed part. The Trainer carries the callbacks of a CLI ``fit`` of
``configs/mlp.yaml`` (``--callbacks cli``: activation monitor every 50 steps, which overrides
``on_before_optimizer_step``; divergence guard; RNG state; checkpoints; TensorBoard; progress bar) or none. Each
round times ``--steps`` steps per route, the rounds rotating which route goes first; the table shows the median
over rounds and the excess over ``bare``.

Usage:
    python benchmarks/step_dispatch.py [--rounds 7] [--steps 500] [--callbacks cli|none] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import BATCH, _sync, add_device_args, chosen_device, device_name  # noqa: E402

from dropout_lab.callbacks import ActivationVarianceMonitor  # noqa: E402
from dropout_lab.data import FashionMNISTDataModule  # noqa: E402
from dropout_lab.models import DropoutMLP  # noqa: E402
from dropout_lab.reliability import DivergenceGuard, LastEveryEpochCheckpoint, RNGStateCheckpoint  # noqa: E402
from dropout_lab.steps import DirectSteps  # noqa: E402

ROUTES = ("lightning dispatch", "DirectSteps", "bare")


class Probe(DropoutMLP):
    """The tiny MLP; its first training step times the routes and then stops the fit."""

    def __init__(self, rounds: int, steps: int, images: int) -> None:
        super().__init__(hidden_sizes=(8,), dropouts=(0.5,), micro_batch_size=BATCH,
                         optimizer=lambda params: torch.optim.SGD(params, lr=0.0))  # fmt: skip
        self.rounds, self.steps, self.images = rounds, steps, images
        self.times: dict[str, list[float]] = {route: [] for route in ROUTES}
        self.hooks: dict[str, list[str]] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Time every route on this batch's first micro-batch, interleaved, then stop."""
        x, y = batch[0][: self.images], batch[1][: self.images]
        optimizer = self.optimizers()
        direct = DirectSteps(self.trainer, self, optimizer)
        self.hooks = {name: [type(fn.__self__).__name__ for fn, _ in hooks] for name, hooks in direct.hooks.items()}

        def lightning(loss: torch.Tensor) -> None:
            self.manual_backward(loss)
            optimizer.step()

        def bare(loss: torch.Tensor) -> None:
            loss.backward()
            optimizer.optimizer.step()

        routes: dict[str, Callable[[torch.Tensor], None]] = {
            "lightning dispatch": lightning, "DirectSteps": direct.step, "bare": bare,
        }  # fmt: skip
        for r in range(self.rounds + 1):  # round 0 warms up; each round starts with the next route (no order bias)
            for route in ROUTES[r % 3 :] + ROUTES[: r % 3]:
                step = routes[route]
                total = 0.0
                for _ in range(self.steps):
                    loss = self.loss_fn(self(x), y)
                    optimizer.zero_grad()
                    _sync()
                    start = time.perf_counter()
                    step(loss)
                    _sync()
                    total += time.perf_counter() - start
                self.times[route].append(total / self.steps * 1e6)
        for route in ROUTES:
            self.times[route] = self.times[route][1:]
        self.trainer.should_stop = True
        return loss.detach()


def main() -> None:
    """Run the routes in one fit and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=500, help="timed steps per route and round")
    parser.add_argument("--images", type=int, default=16, help="images per timed micro-batch")
    parser.add_argument("--callbacks", choices=["cli", "none"], default="cli", help="the Trainer's callbacks")
    parser.add_argument("--data-dir", default=str(ROOT / "data"), help="FashionMNIST folder (torchvision layout)")
    add_device_args(parser)
    args = parser.parse_args()
    device = chosen_device(args)
    with tempfile.TemporaryDirectory() as root:
        callbacks: list[L.Callback] = []
        if args.callbacks == "cli":
            callbacks = [
                TQDMProgressBar(refresh_rate=20), ActivationVarianceMonitor(every_n_steps=50), RNGStateCheckpoint(),
                DivergenceGuard(), LastEveryEpochCheckpoint(dirpath=f"{root}/ckpt"),
            ]  # fmt: skip
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1,
            logger=TensorBoardLogger(root) if args.callbacks == "cli" else False,
            enable_checkpointing=args.callbacks == "cli", enable_progress_bar=args.callbacks == "cli",
            enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
        )  # fmt: skip
        probe = Probe(args.rounds, args.steps, args.images)
        trainer.fit(probe, FashionMNISTDataModule(data_dir=args.data_dir, val_size=0, batch_size=BATCH))
    medians = {route: statistics.median(times) for route, times in probe.times.items()}
    bare = medians["bare"]
    print(f"\nbackward + optimizer step of one micro-batch ({args.images} images, 784-8-10 MLP), "
          f"callbacks: {args.callbacks}; "
          f"medians of {args.rounds} interleaved rounds × {args.steps} steps\n")  # fmt: skip
    print("| route | µs / step | over bare | × bare |")
    print("|---|---|---|---|")
    for route, us in medians.items():
        print(f"| {route} | {us:.1f} | {us - bare:+.1f} | {us / bare:.2f} |")
    saved = medians["lightning dispatch"] - medians["DirectSteps"]
    print(f"\nDirectSteps saves {saved:.1f} µs per optimizer step ({saved * 235 / 1000:.1f} ms per epoch of 235 steps)")
    dispatched = {name: owners for name, owners in probe.hooks.items() if owners}
    print("hooks DirectSteps dispatches:", dispatched or "none")
    print(f"device: {device_name(device)}; torch {torch.__version__}, lightning {L.__version__}")


if __name__ == "__main__":
    main()
