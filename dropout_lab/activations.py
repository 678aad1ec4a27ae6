"""Stochastic activations: random in training, their exact expectation in eval (members of the dropout family)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dropout_lab.dropout import StochasticModule, _DropModule, _finite, scratch_dropout
from dropout_lab.types import check_probability

__all__ = [
    "GaussianNoiseReLU",
    "RandomizedLeakyReLU",
    "StochasticActivationName",
    "StochasticReLU",
    "gaussian_noise_relu",
    "make_stochastic_activation",
    "stochastic_relu",
]

StochasticActivationName = Literal["stochastic_relu", "rrelu", "gaussian_relu"]
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _check_sigma(sigma: float) -> float:
    if not (_finite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    return float(sigma)


def stochastic_relu(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Unbiased stochastic ReLU ``relu(x) * mask / (1 - p)``, mask ~ Bernoulli(1 - p); ``relu`` in eval."""
    return scratch_dropout(F.relu(x), check_probability(p), training)


def gaussian_noise_relu(x: Tensor, sigma: float, training: bool = True) -> Tensor:
    """``relu(x + sigma * eps)``, eps ~ N(0, 1), in training; else its expectation x Phi(x/s) + s phi(x/s).

    ``sigma = 0`` is a plain ``relu`` in both modes.
    """
    sigma = _check_sigma(sigma)
    if sigma == 0:
        return F.relu(x)
    if training:
        return F.relu(x + torch.randn_like(x).mul_(sigma))
    z = x / sigma
    return x * torch.special.ndtr(z) + (sigma * _INV_SQRT_2PI) * torch.exp(-0.5 * z * z)


class StochasticReLU(_DropModule):
    """ReLU followed by inverted dropout, so its expectation is exactly ``relu(x)`` (its eval output).

    Args:
        p: probability of zeroing each activation (0 <= p < 1).
    """

    def forward(self, x: Tensor) -> Tensor:
        """``relu(x)`` with activations dropped and rescaled when stochastic, else ``relu(x)``."""
        return stochastic_relu(x, self.p, self.stochastic)


class RandomizedLeakyReLU(StochasticModule):
    """Randomized leaky ReLU (``F.rrelu``): negative slope ~ U(lower, upper) per element; eval uses the mean.

    ``p`` stays 0 (it has no drop probability); the layer is random while ``upper > lower``.

    Args:
        lower: lower bound of the random negative slope (0 <= lower <= upper).
        upper: upper bound of the random negative slope.
    """

    _repr_fields = ("lower", "upper")

    def __init__(self, lower: float = 1.0 / 8.0, upper: float = 1.0 / 3.0) -> None:
        super().__init__()
        if not (_finite(lower) and _finite(upper) and 0 <= lower <= upper):
            raise ValueError(f"need 0 <= lower <= upper (finite), got lower={lower}, upper={upper}")
        self.lower, self.upper = float(lower), float(upper)

    @property
    def has_noise(self) -> bool:
        """Random while the slope interval is more than a point."""
        return self.upper > self.lower

    def forward(self, x: Tensor) -> Tensor:
        """Random slopes for x < 0 when stochastic, else the mean slope (lower + upper) / 2.

        fp16 on the CPU runs in float32 (PyTorch has no fp16 CPU ``rrelu`` kernel) and rounds back once.
        """
        if x.dtype == torch.float16 and not x.is_cuda:
            return F.rrelu(x.float(), self.lower, self.upper, training=self.stochastic).to(x.dtype)
        return F.rrelu(x, self.lower, self.upper, training=self.stochastic)


class GaussianNoiseReLU(StochasticModule):
    """ReLU of a Gaussian-perturbed input in training; its exact, smooth expectation in eval.

    ``p`` stays 0 (it has no drop probability); the layer is random while ``sigma > 0``.

    Args:
        sigma: standard deviation of the additive input noise (>= 0; 0 gives a plain ReLU).
    """

    _repr_fields = ("sigma",)

    def __init__(self, sigma: float = 0.5) -> None:
        super().__init__()
        self.sigma = _check_sigma(sigma)

    @property
    def has_noise(self) -> bool:
        """Random while ``sigma > 0``."""
        return self.sigma > 0

    def forward(self, x: Tensor) -> Tensor:
        """``relu(x + sigma * eps)`` when stochastic, else its expectation."""
        return gaussian_noise_relu(x, self.sigma, self.stochastic)


def make_stochastic_activation(name: StochasticActivationName, p: float = 0.5) -> StochasticModule:
    """Build a stochastic activation by name.

    Args:
        name: ``"stochastic_relu"``, ``"rrelu"`` or ``"gaussian_relu"``.
        p: the noise level: the drop probability for ``stochastic_relu``, ``sigma`` for ``gaussian_relu``;
            ignored by ``rrelu`` (slopes U(1/8, 1/3)).
    """
    if name == "stochastic_relu":
        return StochasticReLU(p)
    if name == "gaussian_relu":
        return GaussianNoiseReLU(sigma=p)
    if name == "rrelu":
        return RandomizedLeakyReLU()
    raise ValueError(f"unknown stochastic activation {name!r}; use stochastic_relu, rrelu or gaussian_relu")
