"""No host syncs in the training step, checked on the CPU by the ops the step dispatches.

On a GPU a training step that reads a device value on the host (``.item()``, ``float()``, ``bool()``), builds a
tensor from Python data (``torch.tensor(v, device=...)``: a blocking host-to-device copy) or runs an op whose
output size depends on the data waits for the GPU: the CPU can no longer queue the next steps ahead, and the
launch-bound MLP step gets no faster than CPU time + GPU time. :class:`~dropout_lab.op_audit.OpRecorder` sees
those ops on the CPU too (``_local_scalar_dense``, ``lift_fresh``, ``nonzero`` ...), so the CPU test finds them
without a GPU. Values read from an explicit host copy (``x.to("cpu", copy=True)`` and whatever is computed from
it alone) are allowed: that copy is where the sync was paid, on a step that logs. The ``gpu`` test repeats the
check with CUDA's own sync detector.

Each training step is audited from its ``on_train_batch_start`` to the next one, so the progress bar, the
logger connector and every callback of the CLI's set are included. Steps that write logs (every
``log_every_n_steps``) and the epoch's last step may sync; the others must not.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from dropout_lab.callbacks import ActivationVarianceMonitor
from dropout_lab.data import FashionMNISTDataModule
from dropout_lab.models import (
    DropConnectMLP,
    DropoutMLP,
    GaussianDropoutMLP,
    LeNet,
    ScratchDropoutMLP,
    StochasticActivationMLP,
)
from dropout_lab.op_audit import OpRecorder, StepAudit
from dropout_lab.population import PopulationMLP
from dropout_lab.reliability import DivergenceGuard, LastEveryEpochCheckpoint, RNGStateCheckpoint

STEPS, LOG_EVERY = 12, 5


def cli_like_fit(model: L.LightningModule, tmp_path: Path, watcher: L.Callback, accelerator: str = "cpu") -> L.Trainer:
    """A 12-step fit (batch 32) with the callbacks the CLI adds (progress bar refreshed every step, TensorBoard)."""
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_epochs=1, limit_train_batches=STEPS, limit_val_batches=2,
        log_every_n_steps=LOG_EVERY, logger=TensorBoardLogger(tmp_path / "logs"), enable_model_summary=False,
        callbacks=[watcher, TQDMProgressBar(refresh_rate=1), ActivationVarianceMonitor(every_n_steps=LOG_EVERY),
                   RNGStateCheckpoint(), DivergenceGuard(),
                   LastEveryEpochCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_last=True)],
    )  # fmt: skip
    trainer.fit(model, FashionMNISTDataModule(batch_size=32, val_size=100))
    return trainer


def is_loud(batch_idx: int) -> bool:
    """Steps that may sync: the logging steps and the epoch's last."""
    return (batch_idx + 1) % LOG_EVERY == 0 or batch_idx == STEPS - 1


def quiet_steps(audit: StepAudit) -> dict[int, Counter]:
    """What each step that neither logs nor ends the epoch dispatched of :data:`SYNCING_OPS` (by op and line)."""
    assert len(audit.steps) == STEPS
    return {i: rec.syncing for i, rec in audit.steps.items() if not is_loud(i)}


def population() -> PopulationMLP:
    """Two cells (with their own weight decays) × two members, in micro-batches of 8."""
    return PopulationMLP(dropouts=[[0.5, 0.5], [0.1, 0.9]], weight_decays=[0.0, 1e-4], members_per_cell=2,
                         micro_batch_size=8)  # fmt: skip


MODELS = {  # each trained with batch 32
    "nn.Dropout": DropoutMLP,
    "nn.Dropout, micro-batches": lambda: DropoutMLP(micro_batch_size=8),
    "scratch": ScratchDropoutMLP,
    "DropConnect": DropConnectMLP,
    "stochastic activation": StochasticActivationMLP,
    "Gaussian": GaussianDropoutMLP,
    "LeNet": LeNet,
    "population, micro-batches": population,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_training_steps_between_log_steps_do_not_sync(name: str, tmp_path: Path, synthetic_env: None) -> None:
    audit = StepAudit()
    cli_like_fit(MODELS[name](), tmp_path, audit)
    found = quiet_steps(audit)
    assert all(not ops for ops in found.values()), {i: dict(ops) for i, ops in found.items() if ops}


def test_the_recorder_finds_host_syncs() -> None:
    """The recorder catches each kind of sync, and lets values read from an explicit host copy pass."""
    x = torch.randn(8)
    with OpRecorder() as recorder:
        x.sum().item()
        bool((x > 0).any())
        torch.tensor(3.0)
        x.nonzero()
        host = x.mean().to("cpu", copy=True)  # a sync itself (device to host on a GPU) ...
        host.clone().detach().item()  # ... but not what Lightning then does with the logged copy
    assert {name for name, _ in recorder.syncing} == {"_local_scalar_dense", "lift_fresh", "nonzero", "_to_copy"}
    assert sum(recorder.syncing.values()) == 5
    assert all(where.startswith(f"{__file__}:") for _, where in recorder.syncing), recorder.syncing


def test_a_syncing_callback_is_caught(tmp_path: Path, synthetic_env: None) -> None:
    """A callback reading the loss at every step (the mistake the test exists for) is reported with its line."""

    class ReadsLoss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.last = float(outputs["loss"])

    audit = StepAudit()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=STEPS, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[audit, ReadsLoss()])  # fmt: skip
    trainer.fit(DropoutMLP(), FashionMNISTDataModule(batch_size=32, val_size=100))
    found = quiet_steps(audit)
    assert all(sum(ops.values()) == 1 for ops in found.values()), found
    assert all(name == "_local_scalar_dense" and "test_host_sync.py" in where
               for ops in found.values() for name, where in ops)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["nn.Dropout", "nn.Dropout, micro-batches", "population, micro-batches"])
def test_gpu_training_steps_between_log_steps_do_not_sync(name: str, tmp_path: Path, synthetic_env: None) -> None:
    """CUDA's sync detector (``torch.cuda.set_sync_debug_mode('error')``) armed over the quiet steps."""

    class Armed(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            quiet = not is_loud(batch_idx) and batch_idx > 0  # step 0 also sets up CUDA libraries
            torch.cuda.set_sync_debug_mode("error" if quiet else "default")

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            torch.cuda.set_sync_debug_mode("default")

    try:
        trainer = cli_like_fit(MODELS[name](), tmp_path, Armed(), accelerator="gpu")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.global_step > 0
