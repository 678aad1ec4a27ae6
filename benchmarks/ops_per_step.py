"""Ops per optimizer step along the training paths: what a launch-bound GPU pays for, counted on any device.

On an H100 the d2l MLP's step is bound by per-op launch and Python costs and by host syncs, not by arithmetic.
Both are ops PyTorch dispatches, so :class:`dropout_lab.op_audit.OpRecorder` counts them on the CPU as well:

* computing ops (views and other metadata-only ops left out): one kernel launch each on a GPU;
* syncing ops (``.item()``, ``torch.tensor(data)``, data-dependent sizes) not on an explicit host copy: each one
  makes the host wait for the GPU.

Paths (batch 256, SGD lr 0.1, ``val_size: 0``): the bare eager loop of ``benchmarks/speed.py``; the Trainer with
the tensor loader and the callbacks a CLI ``fit`` has (``ActivationVarianceMonitor`` every 50 steps, divergence
guard, RNG state, checkpoints, TensorBoard; ``log_every_n_steps`` 50; no progress bar, which adds no ops: the
values it shows are read by the logger connector either way), with and without micro-batches 8;
and each Trainer path once more with the training accuracy of torchmetrics' ``MulticlassAccuracy`` in place of
the classifiers' ``TopOneAccuracy``. Steps from the third Lightning step on are counted (the first ones create
state), log steps included at their natural rate, and the table shows the means per optimizer step.

``--model population`` counts the swap study of ``configs/population_swap.yaml`` (8 cells × 3 seeds) as one
``PopulationMLP`` (which counts its accuracy itself, so without the torchmetrics rows; its bare loop sums the
members' losses and adds the weight decay as the module does).

Usage:
    python benchmarks/ops_per_step.py [--model mlp|lenet|population] [--weight-decay 0] [--steps 104]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections import Counter
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.classification import MulticlassAccuracy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import BATCH, add_device_args, chosen_device, device_name, make_model  # noqa: E402

from dropout_lab.batches import take  # noqa: E402
from dropout_lab.callbacks import ActivationVarianceMonitor  # noqa: E402
from dropout_lab.data import FashionMNISTDataModule  # noqa: E402
from dropout_lab.op_audit import OpRecorder, StepAudit  # noqa: E402
from dropout_lab.population import PopulationMLP  # noqa: E402
from dropout_lab.reliability import DivergenceGuard, LastEveryEpochCheckpoint, RNGStateCheckpoint  # noqa: E402

WARMUP = 2  # Lightning steps left out of the count
SWAP = ROOT / "configs" / "population_swap.yaml"


def build(kind: str, micro_batch_size: int | None = None, wd: float = 0.0) -> L.LightningModule:
    """``speed.make_model``'s networks, or the swap study's population (``configs/population_swap.yaml``)."""
    if kind == "population":
        cells = yaml.safe_load(SWAP.read_text())["model"]["init_args"]["dropouts"]
        return PopulationMLP(dropouts=cells, weight_decays=[wd], members_per_cell=3,
                             micro_batch_size=micro_batch_size)  # fmt: skip
    return make_model(kind, micro_batch_size=micro_batch_size)


def bare_counts(args: argparse.Namespace, device: torch.device) -> tuple[Counter, Counter, int]:
    """Ops of ``args.steps`` steps of the bare eager loop (after the warm-up), as ``speed.bare_epoch`` runs it."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (BATCH * (args.steps + WARMUP), 28, 28), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (len(images),), device=device)
    model = build(args.model, wd=args.weight_decay).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    recorder = OpRecorder()
    for step, idx in enumerate(torch.randperm(len(labels), device=device).split(BATCH)):
        if step == WARMUP:
            recorder.__enter__()
        x = take(images, idx).unsqueeze(1).to(torch.float32).mul_(1 / 255)
        if isinstance(model, PopulationMLP):  # each member's mean loss, summed; weight decay as the module adds it
            loss = model.member_losses(model(x), take(labels, idx)).sum()
        else:
            loss = loss_fn(model(x), take(labels, idx))
        optimizer.zero_grad()
        loss.backward()
        if isinstance(model, PopulationMLP):
            model.on_before_optimizer_step(optimizer)
        optimizer.step()
    recorder.__exit__(None, None, None)
    return recorder.computing, recorder.syncing, args.steps


def trainer_counts(args: argparse.Namespace, device: torch.device, micro: int, torchmetrics_acc: bool,
                   data_dir: str, root: str) -> tuple[Counter, Counter, int]:  # fmt: skip
    """Ops of the Trainer's steps after the warm-up, per path; returns the counters and the optimizer steps."""
    audit = StepAudit()
    model = build(args.model, BATCH if micro > 1 else None, args.weight_decay)
    if torchmetrics_acc:
        model.train_acc = MulticlassAccuracy(10, average="micro", validate_args=False)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1,
        limit_train_batches=WARMUP + math.ceil(args.steps / micro), log_every_n_steps=50,
        logger=TensorBoardLogger(root), enable_model_summary=False, num_sanity_val_steps=0,
        enable_progress_bar=False,
        callbacks=[audit, ActivationVarianceMonitor(every_n_steps=50),
                   RNGStateCheckpoint(), DivergenceGuard(), LastEveryEpochCheckpoint(dirpath=f"{root}/ckpt")],
    )  # fmt: skip
    trainer.fit(model, FashionMNISTDataModule(data_dir=data_dir, val_size=0, batch_size=BATCH * micro))
    computing, syncing = Counter(), Counter()
    for step, recorder in audit.steps.items():
        if step >= WARMUP:
            computing.update(recorder.computing)
            syncing.update(recorder.syncing)
    return computing, syncing, (len(audit.steps) - WARMUP) * micro


def main() -> None:
    """Count every path and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="mlp",
        choices=["mlp", "lenet", "population"],
        help="the benchmarked network (population: the 24 members of configs/population_swap.yaml)",
    )
    parser.add_argument("--weight-decay", type=float, default=0.0, help="the population's weight decay (all cells)")
    parser.add_argument("--steps", type=int, default=104, help="optimizer steps counted per path")
    parser.add_argument("--data-dir", default="data", help="FashionMNIST folder (torchvision layout)")
    add_device_args(parser)
    args = parser.parse_args()
    device = chosen_device(args)
    with tempfile.TemporaryDirectory() as root:
        rows = {"bare loop, eager": bare_counts(args, device)}
        for micro in (1, 8):
            for tm in (False, True) if args.model != "population" else (False,):
                name = "trainer, tensor loader" + (f" + micro-batches {micro}" if micro > 1 else "")
                name += ", torchmetrics MulticlassAccuracy" if tm else ""
                rows[name] = trainer_counts(args, device, micro, tm, args.data_dir, f"{root}/{len(rows)}")
    bare = sum(rows["bare loop, eager"][0].values()) / rows["bare loop, eager"][2]
    print(f"\n{args.model}: ops per optimizer step (means over {args.steps} steps after {WARMUP} warm-up steps)\n")
    print("| path | computing ops / step | × bare loop | syncing ops / step | most frequent extra ops |")
    print("|---|---|---|---|---|")
    base = rows["bare loop, eager"][0]
    for name, (computing, syncing, steps) in rows.items():
        per_step = sum(computing.values()) / steps
        extra = Counter({op: n / steps - base[op] / args.steps for op, n in computing.items()})
        top = ", ".join(f"{op} {n:+.1f}" for op, n in extra.most_common(4) if n >= 0.05) or "-"
        print(f"| {name} | {per_step:.1f} | {per_step / bare:.2f} | {sum(syncing.values()) / steps:.3f} | {top} |")
    syncs = Counter()
    for _, syncing, _ in rows.values():
        syncs.update(syncing)
    if syncs:
        print("\nsyncing ops by line (all paths):", ", ".join(f"{op} at {at}: {n}" for (op, at), n in syncs.items()))
    print(f"\ndevice: {device_name(device)}; torch {torch.__version__}, lightning {L.__version__}")


if __name__ == "__main__":
    main()
