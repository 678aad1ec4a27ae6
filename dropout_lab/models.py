"""LightningModules: one :class:`ClassifierModule` base that owns the loop, thin subclasses that build nets."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from dropout_lab.types import Probability, check_probabilities

__all__ = ["ActivationName", "ClassifierModule", "DropoutMLP", "default_sgd", "make_activation"]

ActivationName = Literal["relu", "tanh", "sigmoid", "gelu"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
NUM_CLASSES = 10
NUM_INPUTS = 28 * 28


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (``relu``, ``tanh``, ``sigmoid``, ``gelu``)."""
    return _ACTIVATIONS[name]()


def default_sgd(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Plain SGD with lr 0.1, the d2l book's setting; used when no optimizer is configured."""
    return torch.optim.SGD(params, lr=0.1)


class ClassifierModule(L.LightningModule):
    """Base of every classifier: steps, cross-entropy loss, torchmetrics accuracy, logging, optimizer hook.

    Subclasses only build ``self.net`` (a module mapping (B, 1, 28, 28) images to (B, 10) logits).

    Args:
        optimizer: optimizer factory (e.g. ``torch.optim.SGD`` with ``lr``); null = SGD with lr 0.1.
        lr_scheduler: optional learning-rate scheduler factory, stepped once per epoch.
    """

    net: nn.Module

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer or default_sgd
        self.scheduler_factory = lr_scheduler
        self.loss_fn = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 10) for images (B, 1, 28, 28)."""
        return self.net(x)

    def _log_now(self) -> bool:
        """True on the steps where Lightning writes logs (every ``trainer.log_every_n_steps``)."""
        if self._trainer is None:
            return True
        return self.trainer._logger_connector.should_update_logs

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimization step's loss.

        ``train/loss`` is logged only on the steps the logger writes (``trainer.log_every_n_steps``), and
        ``train/acc`` accumulates on the device and is logged once per epoch: no host sync in the step.
        """
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        self.train_acc.update(logits.detach(), y)
        if self._log_now():
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        """Log the epoch's training accuracy (``train/acc``)."""
        self.log("train/acc", self.train_acc.compute())
        self.train_acc.reset()

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        metric = getattr(self, f"{stage}_acc")
        metric.update(logits, y)
        self.log(f"{stage}/loss", self.loss_fn(logits, y), on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Logs ``val/loss`` and ``val/acc`` (epoch means)."""
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Logs ``test/loss`` and ``test/acc`` (means over the test set)."""
        self._eval_step(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Class probabilities (B, 10)."""
        return self(batch[0]).softmax(dim=-1)

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


class DropoutMLP(ClassifierModule):
    """Multilayer perceptron with ``nn.Dropout`` after each hidden activation (the d2l concise model).

    Args:
        hidden_sizes: width of each hidden layer.
        dropouts: dropout probability after each hidden layer, one per entry of ``hidden_sizes`` (0 ≤ p < 1).
        input_dropout: dropout probability on the input pixels (0 ≤ p < 1).
        activation: hidden non-linearity.
        optimizer: optimizer factory (e.g. ``torch.optim.SGD`` with ``lr``); null = SGD with lr 0.1.
        lr_scheduler: optional learning-rate scheduler factory, stepped once per epoch.
    """

    def __init__(
        self,
        hidden_sizes: Sequence[PositiveInt] = (256, 256),
        dropouts: Sequence[Probability] = (0.5, 0.5),
        input_dropout: Probability = 0.0,
        activation: ActivationName = "relu",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        check_probabilities(hidden_sizes, dropouts, input_dropout)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = NUM_INPUTS
        for size, p in zip(hidden_sizes, dropouts, strict=True):
            layers += [nn.Linear(width, size), make_activation(activation), nn.Dropout(p)]
            width = size
        layers.append(nn.Linear(width, NUM_CLASSES))
        self.net = nn.Sequential(*layers)
