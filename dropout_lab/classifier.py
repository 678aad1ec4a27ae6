"""``ClassifierModule``: the one LightningModule base that owns steps, loss, metrics, logging and optimizers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from dropout_lab.metrics import TopOneAccuracy
from dropout_lab.steps import DirectSteps, direct_steps_refusal

__all__ = ["ClassifierModule", "default_sgd"]


def default_sgd(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Plain SGD with lr 0.1, the d2l book's setting; used when no optimizer is configured."""
    return torch.optim.SGD(params, lr=0.1)


class ClassifierModule(L.LightningModule):
    """Base of every classifier: steps, cross-entropy loss, torchmetrics accuracy, logging, optimizer hook.

    Subclasses only build ``self.net`` (a module mapping (B, 1, 28, 28) images to (B, 10) logits).

    Args:
        optimizer: optimizer factory (e.g. ``torch.optim.SGD`` with ``lr``); null = SGD with lr 0.1.
        lr_scheduler: optional learning-rate scheduler factory, stepped once per epoch.
        micro_batch_size: split each training batch into micro-batches of this many images, one optimizer step
            each, in one Lightning step; with data.batch_size = K × micro_batch_size the updates equal those of
            batch micro_batch_size at 1/K of Lightning's per-step cost (speed option; null = off).
    """

    net: nn.Module
    mc_samples: int = 0
    mc_share_prefix: bool = True
    """``share_prefix`` of the ``mc`` and ``rotated`` subcommands' MC passes (see
    :func:`dropout_lab.uncertainty.mc_predict`, which checks that sharing is right for the network; False skips
    the check and runs every pass through the whole net)."""
    logits_batch_dim: int = 0
    """The batch dimension of the net's logits (``PopulationMLP``'s (K, B, 10): 1), where the micro-batches' logits
    are joined to count ``train/acc`` once per Lightning step."""
    test_in_memory_after_fit: bool = False
    """``fit``'s test after training uses the weights in memory instead of the best checkpoint (True where the
    module keeps its own best weights: ``PopulationMLP`` with ``test_weights: best``, whose members' best epochs
    a single best-by-the-mean checkpoint would undo)."""
    direct_steps: bool = True
    """With ``micro_batch_size``: take each optimizer step through :class:`~dropout_lab.steps.DirectSteps` where
    the Trainer allows it (the same hooks, ops and updates without Lightning's per-step dispatch); False: always
    through ``manual_backward`` and ``LightningOptimizer.step`` (for comparison: ``benchmarks/step_dispatch.py``)."""

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        micro_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"model.micro_batch_size: must be a positive integer or null, got {micro_batch_size}")
        self.optimizer_factory = optimizer or default_sgd
        self.scheduler_factory = lr_scheduler
        self.micro_batch_size = micro_batch_size
        self._warned_partial = False
        self._steps: DirectSteps | None = None
        self._deferred: list[torch.Tensor] | None = None  # micro-batches' logits, counted at the batch's end
        self.automatic_optimization = micro_batch_size is None
        self.loss_fn = nn.CrossEntropyLoss()
        self.train_acc, self.val_acc, self.test_acc = TopOneAccuracy(), TopOneAccuracy(), TopOneAccuracy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 10) for images (B, 1, 28, 28)."""
        return self.net(x)

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``, except under ``Trainer(barebones=True)``, which forbids logging: a no-op there."""
        if self._trainer is not None and self.trainer.barebones:
            return
        super().log(name, value, *args, **kwargs)

    def _log_now(self) -> bool:
        """True on the steps where Lightning writes logs (every ``trainer.log_every_n_steps``)."""
        if self._trainer is None:
            return True
        return self.trainer._logger_connector.should_update_logs

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimization step's loss (with ``micro_batch_size``: several steps, see :meth:`_micro_batch_steps`).

        ``train/loss`` is logged only on the steps the logger writes (``trainer.log_every_n_steps``), and
        ``train/acc`` accumulates on the device and is logged once per epoch: no host sync in the step.
        """
        x, y = batch
        if not self.automatic_optimization:
            return self._micro_batch_steps(x, y)
        loss, logged = self.train_loss(x, y)
        self._log_train_loss(logged)
        return loss

    def train_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to minimize on one (micro-)batch and the value ``train/loss`` shows; counts ``train/acc``."""
        logits = self(x)
        loss = self.loss_fn(logits, y)
        self._count_train(logits.detach(), y)
        return loss, loss.detach()

    def count_train(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch's (detached) logits and labels to the training accuracy."""
        self.train_acc.update(logits, y)

    def _count_train(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """:meth:`count_train` now, or, inside the micro-batch loop, once for the whole batch at its end."""
        if self._deferred is None:
            self.count_train(logits, y)
        elif self._compiled_call_impl is not None:
            # compiled with CUDA graphs, the logits live in the graph's memory pool and the next micro-batch's
            # replay overwrites them: keep a copy (one op instead of the 5 of counting now)
            self._deferred.append(logits.clone())
        else:
            self._deferred.append(logits)

    def __getstate__(self) -> dict[str, Any]:
        """The pickled state (``torch.save``, ``ddp_spawn``, ``deepcopy``), without the last fit's ``DirectSteps``.

        ``DirectSteps`` holds its Trainer and optimizer; Lightning leaves the Trainer out in the same way.
        """
        state = super().__getstate__()
        state["_steps"], state["_deferred"] = None, None
        return state

    def _log_train_loss(self, loss: torch.Tensor) -> None:
        if self._log_now():
            # Logged as a host copy: after every batch Lightning turns the progress bar's values into numbers,
            # which for a value on the GPU is a host sync at every step; this way only the logging steps sync.
            # (copy=True makes the copy an op on a CPU too, so dropout_lab.op_audit can follow it.)
            self.log("train/loss", loss.detach().to("cpu", copy=True), on_step=True, on_epoch=False, prog_bar=True)

    def _micro_batch_steps(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step per ``micro_batch_size`` rows of the batch (manual optimization).

        The steps are those automatic optimization makes with ``data.batch_size = micro_batch_size``: the same
        micro-batches in the same order, each with zeroed gradients, a backward and an optimizer step, and the
        dropout masks drawn in the same order. Returns the mean micro-batch loss (detached; non-finite if any
        micro-batch's loss was), which is what ``train/loss`` logs.
        """
        optimizer, trainer = self.optimizers(), self.trainer
        if len(x) % self.micro_batch_size and not self._epoch_ends_here() and not self._warned_partial:
            self._warned_partial = True
            rank_zero_warn(
                f"model.micro_batch_size ({self.micro_batch_size}) does not divide the batch size ({len(x)}): "
                "each batch ends with a smaller micro-batch, so the updates differ from those of batch "
                f"{self.micro_batch_size}; make data.batch_size a multiple of it"
            )
        steps, losses, done = self._direct_steps(optimizer), [], 0
        self._deferred = []
        try:
            for xs, ys in zip(x.split(self.micro_batch_size), y.split(self.micro_batch_size), strict=True):
                if 0 <= trainer.max_steps <= trainer.global_step:
                    break  # max_steps counts optimizer steps: stop inside the batch, as batch-size-K training would
                loss, logged = self.train_loss(xs, ys)
                done += len(xs)
                optimizer.zero_grad()
                if steps is None:
                    self.manual_backward(loss)
                    optimizer.step()
                else:
                    steps.step(loss)
                losses.append(logged)
        finally:
            deferred, self._deferred = self._deferred, None
        if deferred:  # the same counts as one update per micro-batch, in 1/K of the ops
            logits = deferred[0] if len(deferred) == 1 else torch.cat(deferred, self.logits_batch_dim)
            self.count_train(logits, y[:done])
        if self.scheduler_factory is not None and self._epoch_ends_here():
            self.lr_schedulers().step()  # where automatic optimization steps an epoch scheduler: before validation
        loss = torch.stack(losses).mean()
        self._log_train_loss(loss)
        return loss

    def _direct_steps(self, optimizer: Any) -> DirectSteps | None:
        """This fit's :class:`DirectSteps` for ``optimizer`` (built at its first step), or None where not used."""
        if not self.direct_steps or direct_steps_refusal(self.trainer) is not None:
            return None
        steps = self._steps
        if steps is None or steps.optimizer is not optimizer or steps.trainer is not self.trainer:
            steps = self._steps = DirectSteps(self.trainer, self, optimizer)
        return steps

    def _epoch_ends_here(self) -> bool:
        """True in the epoch's last training step (Lightning's own test, as in its epoch loop)."""
        trainer = self.trainer
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return ready == trainer.num_training_batches or trainer.is_last_batch

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume a fit across a change of ``micro_batch_size`` (the step counters would restart at 0).

        Lightning counts automatic and manual optimizer steps separately, so switching between them on resume
        would reset ``global_step``; test, predict and the MC commands load such checkpoints freely.
        """
        if self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return
        saved = checkpoint.get("hyper_parameters", {}).get("micro_batch_size")
        if (saved is None) != (self.micro_batch_size is None):  # the CLI prints this as one `error:` line, exit 2
            raise MisconfigurationException(
                f"model.micro_batch_size: the checkpoint was trained with {_yaml(saved)}, this run asks for "
                f"{_yaml(self.micro_batch_size)}; resuming across a switch between micro-batches and plain steps would "
                "restart the step count. Resume with the checkpoint's setting (any value > 0 counts as on)"
            )

    def on_train_epoch_end(self) -> None:
        """Log the epoch's training accuracy (``train/acc``)."""
        self.log("train/acc", self.train_acc.compute())
        self.train_acc.reset()

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        metric = getattr(self, f"{stage}_acc")
        metric.update(logits, y)
        # every DDP rank evaluates the whole split, so the synced mean equals the single-process one
        self.log(f"{stage}/loss", self.loss_fn(logits, y), on_step=False, on_epoch=True, sync_dist=True)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Logs ``val/loss`` and ``val/acc`` (epoch means)."""
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Logs ``test/loss`` and ``test/acc`` (means over the test set)."""
        self._eval_step(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Class probabilities (B, 10) and targets; with ``mc_samples`` > 0 also the MC-dropout summaries.

        ``mc_samples`` is set by the ``mc`` subcommand; the MC passes run with every dropout-family layer
        random even though Lightning has put the module in eval mode (see :func:`dropout_lab.uncertainty.mc_mode`).
        """
        x, y = batch
        out = {"probs": self(x).softmax(dim=-1), "target": y}
        if self.mc_samples:
            from dropout_lab.uncertainty import mc_predict

            result = mc_predict(self, x, self.mc_samples, share_prefix=self.mc_share_prefix)
            out |= {
                "mc_probs": result.mean_probs,
                "entropy": result.predictive_entropy,
                "mutual_information": result.mutual_information,
                "variance": result.variance,
            }
        return out

    def on_fit_start(self) -> None:
        """Record the optimizer's class and settings (lr, momentum, weight decay) with the run's hyperparameters."""
        if self.logger is None:
            return
        params: dict[str, object] = {}
        for i, optimizer in enumerate(self.trainer.optimizers):
            prefix = "optimizer" if i == 0 else f"optimizer{i}"
            params[prefix] = type(optimizer).__name__
            for key in ("lr", "momentum", "weight_decay", "betas", "nesterov"):
                if key in optimizer.defaults:
                    params[f"{prefix}.{key}"] = optimizer.defaults[key]
        self.logger.log_hyperparams(params)

    def configure_optimizers(self) -> Any:
        """The injected optimizer (and scheduler, if any) over all parameters."""
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}


def _yaml(value: object) -> str:
    """A config value as YAML writes it (``null`` for None)."""
    return "null" if value is None else str(value)
