"""Callbacks for runs that survive crashes: ``last.ckpt`` every epoch, RNG states in it, a stop on divergence."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

__all__ = [
    "DivergenceError",
    "DivergenceGuard",
    "LastEveryEpochCheckpoint",
    "RNGStateCheckpoint",
    "rng_state",
    "set_rng_state",
]


def rng_state() -> dict[str, Any]:
    """Every random generator's state, as tensors and plain types only (loads with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "cached": cached},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


class RNGStateCheckpoint(Callback):
    """Saves the torch, CUDA, numpy and Python RNG states in every checkpoint and restores them on resume.

    With the data order a function of (seed, epoch) (see :class:`dropout_lab.data.EpochPermutation`) and the
    optimizer state in the checkpoint, ``fit --ckpt_path last`` then continues exactly as the run would have:
    the same dropout masks, the same batches, the same final metrics.
    """

    def state_dict(self) -> dict[str, Any]:
        """The generators' states at the moment the checkpoint is written."""
        return rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Put the generators back where they were when the checkpoint was written."""
        if state_dict:
            set_rng_state(state_dict)


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


class DivergenceGuard(Callback):
    """Stops training, with the step named, as soon as the training loss is NaN or infinite.

    The first non-finite step is recorded on the device every step (no host sync), and read on the steps the
    logger writes, on the last batch of every epoch and before every validation, so a diverged model never
    reaches a checkpoint.

    Args:
        hint: what to suggest in the error message.
    """

    def __init__(self, hint: str = "lower the learning rate (model.init_args.optimizer.init_args.lr)") -> None:
        self.hint = hint
        self._first: torch.Tensor | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        """Record the step if this batch's loss is not finite; check on log steps and at the epoch's end."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        step = trainer.global_step - 1  # the optimizer step this loss belongs to (already counted)
        if self._first is None or self._first.device != loss.device:
            self._first = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self._first < 0)
        self._first.masked_fill_(bad, step)  # the step goes in as a kernel argument: no host-to-device copy
        last = batch_idx + 1 >= trainer.num_training_batches
        if last or trainer._logger_connector.should_update_logs:
            self.check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Never validate (and so never checkpoint) a diverged model: also a validation inside an epoch.

        (``trainer.training`` is already False here, so the fit is recognized by its stage.)
        """
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check before the epoch-end checkpoint (runs before ``ModelCheckpoint``, which Lightning puts last)."""
        self.check(trainer, pl_module)

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule | None = None) -> None:
        """Raise :class:`DivergenceError` if a non-finite loss was seen or (given the module) a weight is not finite.

        One host sync for the loss flag, one more for the weights.
        """
        first = -1 if self._first is None else int(self._first.item())
        what = f"the training loss was not finite at step {first}"
        if first < 0 and pl_module is not None:
            finite = [torch.isfinite(p).all() for p in pl_module.parameters()]
            if finite and not bool(torch.stack(finite).all()):
                first, what = trainer.global_step, f"a weight was not finite after step {trainer.global_step - 1}"
        if first >= 0:
            # Lightning clips gradients only under automatic optimization (not with model.micro_batch_size)
            clip = ", or clip gradients (--trainer.gradient_clip_val 1.0)"
            module = pl_module if pl_module is not None else getattr(trainer, "lightning_module", None)
            if module is not None and not module.automatic_optimization:
                clip = ""
            detail = getattr(module, "divergence_detail", None)  # e.g. PopulationMLP: which members diverged
            what += f"; {detail()}" if callable(detail) else ""
            raise DivergenceError(
                f"training diverged: {what} (epoch {trainer.current_epoch}); "
                f"{self.hint}{clip}. "
                "No checkpoint was written from the diverged weights."
            )


class LastEveryEpochCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` after every epoch, not only when a top-k file is saved.

    Lightning 2.6 refreshes ``last.ckpt`` only together with a top-k checkpoint, so after a few epochs without
    a new best the newest weights were nowhere on disk; a crash then lost them. With this class a run killed at
    any point resumes (``fit --ckpt_path last``) from the end of its last finished epoch.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the top-k checkpoint as usual, then ``last.ckpt`` if it was not just written."""
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write ``last.ckpt`` at the end of every epoch, unless this step was just saved.

        The validation that ends an epoch runs before this hook and has saved it then; an epoch that validates
        only inside it (``val_check_interval`` < 1, or an integer one with ``check_val_every_n_epoch: null``),
        or not at all (``check_val_every_n_epoch`` N, no validation data), saves its last weights here.
        """
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_now(trainer)

    def _save_last_now(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
