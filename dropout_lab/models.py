"""The LightningModules: thin subclasses of :class:`~dropout_lab.classifier.ClassifierModule` that build nets."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from dropout_lab.activations import (
    GaussianNoiseReLU,
    RandomizedLeakyReLU,
    StochasticActivationName,
    StochasticReLU,
)
from dropout_lab.classifier import ClassifierModule, default_sgd
from dropout_lab.dropconnect import DropConnectLinear
from dropout_lab.dropout import (
    Dropout,
    GaussianDropout,
    StochasticModule,
)
from dropout_lab.nets import ACTIVATIONS, ActivationName, ScratchMLP, lenet, mlp
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


class DropoutMLP(ClassifierModule):
    """Multilayer perceptron with PyTorch's dropout after each hidden activation (the d2l concise model).

    Args:
        hidden_sizes: width of each hidden layer.
        dropouts: dropout probability after each hidden layer, one per entry of ``hidden_sizes`` (0 ≤ p < 1).
        input_dropout: dropout probability on the input pixels (0 ≤ p < 1).
        activation: hidden non-linearity.
        optimizer: optimizer factory (e.g. ``torch.optim.SGD`` with ``lr``); null = SGD with lr 0.1.
        lr_scheduler: optional learning-rate scheduler factory, stepped once per epoch.
        micro_batch_size: split each training batch into micro-batches of this many images, one optimizer step
            each, in one Lightning step; with data.batch_size = K × micro_batch_size the updates equal those of
            batch micro_batch_size at 1/K of Lightning's per-step cost (speed option; null = off).
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
        micro_batch_size: PositiveInt | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, micro_batch_size)
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
        micro_batch_size: split each training batch into micro-batches of this many images, one optimizer step
            each, in one Lightning step; with data.batch_size = K × micro_batch_size the updates equal those of
            batch micro_batch_size at 1/K of Lightning's per-step cost (speed option; null = off).
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
        micro_batch_size: split each training batch into micro-batches of this many images, one optimizer step
            each, in one Lightning step; with data.batch_size = K × micro_batch_size the updates equal those of
            batch micro_batch_size at 1/K of Lightning's per-step cost (speed option; null = off).
    """

    def __init__(
        self,
        hidden_sizes: Sequence[PositiveInt] = (256, 256),
        dropouts: Sequence[Probability] = (0.5, 0.5),
        activation: ActivationName = "relu",
        weight_std: PositiveFloat | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        micro_batch_size: PositiveInt | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, micro_batch_size)
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
        micro_batch_size: split each training batch into micro-batches of this many images, one optimizer step
            each, in one Lightning step; with data.batch_size = K × micro_batch_size the updates equal those of
            batch micro_batch_size at 1/K of Lightning's per-step cost (speed option; null = off).
    """

    def __init__(
        self,
        hidden_sizes: Sequence[PositiveInt] = (256, 256),
        dropouts: Sequence[Probability] = (0.5, 0.5),
        activation: ActivationName = "relu",
        per_sample: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        micro_batch_size: PositiveInt | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, micro_batch_size)
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
        micro_batch_size: split each training batch into micro-batches of this many images, one optimizer step
            each, in one Lightning step; with data.batch_size = K × micro_batch_size the updates equal those of
            batch micro_batch_size at 1/K of Lightning's per-step cost (speed option; null = off).
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
        micro_batch_size: PositiveInt | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, micro_batch_size)
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
        scratch_channel_dropout: use the scratch channel-wise dropout instead of ``nn.Dropout2d``'s kernel (for
            bf16/fp16 activations, e.g. under bf16 autocast, ``Dropout2d`` runs the scratch kernel too).
        channels_last: keep conv weights and activations in channels-last (NHWC) memory: the same math, a
            different layout; 1.44× faster training steps on this x86 CPU (oneDNN), see the README.
        optimizer: optimizer factory (e.g. ``torch.optim.SGD`` with ``lr``); null = SGD with lr 0.1.
        lr_scheduler: optional learning-rate scheduler factory, stepped once per epoch.
        micro_batch_size: split each training batch into micro-batches of this many images, one optimizer step
            each, in one Lightning step; with data.batch_size = K × micro_batch_size the updates equal those of
            batch micro_batch_size at 1/K of Lightning's per-step cost (speed option; null = off).
    """

    def __init__(
        self,
        conv_dropouts: Sequence[Probability] = (0.1, 0.1),
        dense_dropout: Probability = 0.5,
        channels: Sequence[PositiveInt] = (20, 50),
        hidden: PositiveInt = 500,
        scratch_channel_dropout: bool = False,
        channels_last: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        micro_batch_size: PositiveInt | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, micro_batch_size)
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
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 10) for images (B, 1, 28, 28), in the configured memory format."""
        return self.net(x.contiguous(memory_format=self.memory_format))
