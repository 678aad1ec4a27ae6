"""What the activation-variance callback measures: the watched layer types and the per-unit batch variance."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATION_TYPES", "activation_variance"]

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Threshold,
)  # fmt: skip
"""The hidden non-linearities watched by default (together with every :class:`StochasticModule`)."""


def activation_variance(x: Tensor) -> Tensor:
    """Per-unit variance across the batch, averaged over units, as a 0-dim float tensor on ``x``'s device.

    Every position of a sample is a unit: for (N, D) the D features, for conv maps (N, C, H, W) each (c, h, w).
    The variance is the population one (``correction=0``, divide by N): it describes the batch at hand and is
    defined (0) for a batch of one. No host synchronization.
    """
    x = x.detach()
    x = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.unsqueeze(1)
    if x.dtype != torch.float64:
        x = x.float()
    return x.var(dim=0, correction=0).mean()
