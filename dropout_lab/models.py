"""LightningModules: one :class:`ClassifierModule` base that owns the loop, thin subclasses that build nets."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from dropout_lab.dropout import (
    DropConnectLinear,
    Dropout,
    GaussianDropout,
    GaussianNoiseReLU,
    RandomizedLeakyReLU,
    StochasticActivationName,
    StochasticModule,
    StochasticReLU,
)
from dropout_lab.nets import ACTIVATIONS, NUM_CLASSES, ActivationName, ScratchMLP, lenet, mlp
from dropout_lab.types import Probability, check_probabilities, check_probability

__all__ = [
    "ClassifierModule",
    "DropConnectMLP",
    "DropoutMLP",
    "GaussianDropoutMLP",
    "LeNet",
    "ScratchDropoutMLP",
    "StochasticActivationMLP",
    "default_sgd",
]


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
    mc_samples: int = 0

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

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Class probabilities (B, 10) and targets; with ``mc_samples`` > 0 also the MC-dropout summaries.

        ``mc_samples`` is set by the ``mc`` subcommand; the MC passes run with every dropout-family layer
        random even though Lightning has put the module in eval mode (see :func:`dropout_lab.uncertainty.mc_mode`).
        """
        x, y = batch
        out = {"probs": self(x).softmax(dim=-1), "target": y}
        if self.mc_samples:
            from dropout_lab.uncertainty import mc_predict

            result = mc_predict(self, x, self.mc_samples)
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


class DropoutMLP(ClassifierModule):
    """Multilayer perceptron with PyTorch's dropout after each hidden activation (the d2l concise model).

    Args:
        hidden_sizes: width of each hidden layer.
        dropouts: dropout probability after each hidden layer, one per entry of ``hidden_sizes`` (0 ≤ p < 1).
        input_dropout: dropout probability on the input pixels (0 ≤ p < 1).
        activation: hidden non-linearity.
        optimizer: optimizer factory (e.g. ``torch.optim.SGD`` with ``lr``); null = SGD with lr 0.1.
        lr_scheduler: optional learning-rate scheduler factory, stepped once per epoch.
    """

    noise_cls: type[StochasticModule] = Dropout

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
        self.net = mlp(
            hidden_sizes,
            noise=lambda i, _: self.noise_cls(dropouts[i]),
            activation=ACTIVATIONS[activation],
            input_noise=self.noise_cls(input_dropout),
        )


class GaussianDropoutMLP(DropoutMLP):
    """The same MLP with multiplicative Gaussian noise N(1, p/(1−p)) in place of each dropout layer.

    Args:
        hidden_sizes: width of each hidden layer.
        dropouts: equivalent drop probability after each hidden layer, one per hidden layer (0 ≤ p < 1);
            the noise variance is p/(1−p), the variance of inverted dropout with that p.
        input_dropout: equivalent drop probability of the noise on the input pixels (0 ≤ p < 1).
        activation: hidden non-linearity.
        optimizer: optimizer factory (e.g. ``torch.optim.SGD`` with ``lr``); null = SGD with lr 0.1.
        lr_scheduler: optional learning-rate scheduler factory, stepped once per epoch.
    """

    noise_cls = GaussianDropout


class ScratchDropoutMLP(ClassifierModule):
    """The d2l scratch model: hand-made parameters, ``X @ W + b``, and inverted dropout with its own autograd.

    Args:
        hidden_sizes: width of each hidden layer.
        dropouts: dropout probability after each hidden layer, one per entry of ``hidden_sizes`` (0 ≤ p < 1).
        activation: hidden non-linearity.
        weight_std: null = initialise like ``nn.Linear`` (uniform ±1/√fan_in); a number = weights
            ~ N(0, weight_std²) with zero biases, as in the book's scratch MLP (0.01).
        optimizer: optimizer factory (e.g. ``torch.optim.SGD`` with ``lr``); null = SGD with lr 0.1.
        lr_scheduler: optional learning-rate scheduler factory, stepped once per epoch.
    """

    def __init__(
        self,
        hidden_sizes: Sequence[PositiveInt] = (256, 256),
        dropouts: Sequence[Probability] = (0.5, 0.5),
        activation: ActivationName = "relu",
        weight_std: PositiveFloat | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        check_probabilities(hidden_sizes, dropouts)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = ScratchMLP(hidden_sizes, dropouts, activation, weight_std)


class DropConnectMLP(ClassifierModule):
    """MLP whose hidden layers drop weights, not activations (DropConnect, Wan et al. 2013).

    Args:
        hidden_sizes: width of each hidden layer.
        dropouts: probability of dropping each weight of hidden layer i, one per hidden layer (0 ≤ p < 1).
        activation: hidden non-linearity.
        per_sample: draw a weight mask per example instead of one per batch (memory: batch × out × in).
        optimizer: optimizer factory (e.g. ``torch.optim.SGD`` with ``lr``); null = SGD with lr 0.1.
        lr_scheduler: optional learning-rate scheduler factory, stepped once per epoch.
    """

    def __init__(
        self,
        hidden_sizes: Sequence[PositiveInt] = (256, 256),
        dropouts: Sequence[Probability] = (0.5, 0.5),
        activation: ActivationName = "relu",
        per_sample: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        check_probabilities(hidden_sizes, dropouts)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = mlp(
            hidden_sizes,
            noise=lambda i, _: nn.Identity(),
            activation=ACTIVATIONS[activation],
            linear=lambda i, fan_in, fan_out: DropConnectLinear(fan_in, fan_out, dropouts[i], per_sample=per_sample),
        )


class StochasticActivationMLP(ClassifierModule):
    """MLP whose hidden non-linearity is random in training and equals its expectation in eval.

    Args:
        hidden_sizes: width of each hidden layer.
        activation: ``stochastic_relu`` (ReLU with inverted dropout of rate ``p``, unbiased), ``rrelu``
            (negative slope ~ U(``lower``, ``upper``), mean slope in eval) or ``gaussian_relu``
            (ReLU of the input plus N(0, ``sigma``²) noise; its exact expectation in eval).
        p: drop probability of ``stochastic_relu`` (0 ≤ p < 1).
        sigma: noise standard deviation of ``gaussian_relu``.
        lower: lowest negative slope of ``rrelu``.
        upper: highest negative slope of ``rrelu``.
        optimizer: optimizer factory (e.g. ``torch.optim.SGD`` with ``lr``); null = SGD with lr 0.1.
        lr_scheduler: optional learning-rate scheduler factory, stepped once per epoch.
    """

    def __init__(
        self,
        hidden_sizes: Sequence[PositiveInt] = (256, 256),
        activation: StochasticActivationName = "stochastic_relu",
        p: Probability = 0.5,
        sigma: NonNegativeFloat = 0.5,
        lower: NonNegativeFloat = 1.0 / 8.0,
        upper: NonNegativeFloat = 1.0 / 3.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        check_probability(p, "model.p")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        factories: dict[str, Callable[[], nn.Module]] = {
            "stochastic_relu": lambda: StochasticReLU(p),
            "rrelu": lambda: RandomizedLeakyReLU(lower, upper),
            "gaussian_relu": lambda: GaussianNoiseReLU(sigma),
        }
        self.net = mlp(hidden_sizes, noise=lambda i, _: nn.Identity(), activation=factories[activation])


class LeNet(ClassifierModule):
    """LeNet with spatial dropout after each conv and dropout after the dense layer.

    conv(1→20, 5×5, pad 2) → ReLU → Dropout2d → max-pool → conv(20→50, 5×5, pad 2) → ReLU → Dropout2d →
    max-pool → dense 2450→500 → ReLU → Dropout → 10.

    Args:
        conv_dropouts: channel-dropout probability after each of the two conv layers (0 ≤ p < 1).
        dense_dropout: dropout probability after the hidden dense layer (0 ≤ p < 1).
        channels: output channels of the two conv layers.
        hidden: width of the hidden dense layer.
        scratch_channel_dropout: use the scratch channel-wise dropout instead of ``nn.Dropout2d``'s kernel.
        optimizer: optimizer factory (e.g. ``torch.optim.SGD`` with ``lr``); null = SGD with lr 0.1.
        lr_scheduler: optional learning-rate scheduler factory, stepped once per epoch.
    """

    def __init__(
        self,
        conv_dropouts: Sequence[Probability] = (0.1, 0.1),
        dense_dropout: Probability = 0.5,
        channels: Sequence[PositiveInt] = (20, 50),
        hidden: PositiveInt = 500,
        scratch_channel_dropout: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        check_probabilities(
            channels,
            conv_dropouts,
            dense_dropout,
            key="model.conv_dropouts",
            per="conv layer",
            extra_key="model.dense_dropout",
        )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = lenet(conv_dropouts, dense_dropout, channels, hidden, scratch_channel_dropout)
