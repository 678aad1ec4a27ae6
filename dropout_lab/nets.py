"""Plain ``nn.Module`` networks (images (B, 1, 28, 28) → logits (B, 10)) built by the LightningModules.

Every noise layer is a member of the dropout family (:mod:`dropout_lab.dropout`), so MC dropout and the
activation-variance callback see all of them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from dropout_lab.dropconnect import DropConnectLinear
from dropout_lab.dropout import ChannelDropout, Dropout, Dropout2d, ScratchDropout

__all__ = ["ACTIVATIONS", "NUM_CLASSES", "NUM_INPUTS", "ActivationName", "ScratchMLP", "lenet", "mlp"]

NUM_CLASSES = 10
NUM_INPUTS = 28 * 28
ActivationName = Literal["relu", "tanh", "sigmoid", "gelu"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def mlp(
    hidden_sizes: Sequence[int],
    noise: Callable[[int, int], nn.Module],
    activation: Callable[[], nn.Module] | None = None,
    linear: Callable[[int, int, int], nn.Module] | None = None,
    input_noise: nn.Module | None = None,
) -> nn.Sequential:
    """Flatten → [input noise] → (linear → activation → noise) per hidden layer → linear to 10 logits.

    Args:
        hidden_sizes: width of each hidden layer.
        noise: ``noise(layer_index, width)`` returns the module placed after hidden layer ``layer_index``
            (e.g. ``Dropout(p)``; ``Dropout(0)`` is free: it returns its input).
        activation: factory of the hidden non-linearity (default ``nn.ReLU``).
        linear: ``linear(layer_index, in, out)`` builds hidden layer ``layer_index`` (default ``nn.Linear``).
        input_noise: module applied to the flattened pixels first (e.g. input dropout).
    """
    layers: list[nn.Module] = [nn.Flatten()]
    if input_noise is not None:
        layers.append(input_noise)
    width = NUM_INPUTS
    for i, size in enumerate(hidden_sizes):
        layers.append(linear(i, width, size) if linear else nn.Linear(width, size))
        layers.append(activation() if activation else nn.ReLU())
        layers.append(noise(i, size))
        width = size
    layers.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*layers)


class ScratchMLP(nn.Module):
    """MLP whose weights are created and initialised by hand (the d2l scratch model) with scratch dropout.

    Args:
        hidden_sizes: width of each hidden layer.
        dropouts: drop probability after each hidden layer.
        activation: hidden non-linearity.
        weight_std: null = initialise like ``nn.Linear`` (uniform ±1/√fan_in, weights and biases);
            a number = weights ~ N(0, weight_std²) and zero biases, as in the book's scratch MLP (0.01).
    """

    def __init__(
        self,
        hidden_sizes: Sequence[int],
        dropouts: Sequence[float],
        activation: ActivationName = "relu",
        weight_std: float | None = None,
    ) -> None:
        super().__init__()
        if len(dropouts) != len(hidden_sizes):
            raise ValueError(f"dropouts: one per hidden layer ({len(hidden_sizes)}), got {list(dropouts)}")
        sizes = [NUM_INPUTS, *hidden_sizes, NUM_CLASSES]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in itertools.pairwise(sizes):
            if weight_std is None:
                bound = 1.0 / math.sqrt(fan_in)
                w = torch.empty(fan_in, fan_out).uniform_(-bound, bound)
                b = torch.empty(fan_out).uniform_(-bound, bound)
            else:
                w, b = torch.randn(fan_in, fan_out) * weight_std, torch.zeros(fan_out)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))
        self.activation = ACTIVATIONS[activation]()
        self.dropouts = nn.ModuleList(ScratchDropout(p) for p in dropouts)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, 10): ``H = dropout(act(X W + b))`` per hidden layer, then ``H W + b``."""
        h = x.reshape(x.shape[0], -1)
        # indexed, not sliced: torch 2.11's compiler cannot trace a ParameterList slice (a graph break)
        for i, drop in enumerate(self.dropouts):
            h = drop(self.activation(h @ self.weights[i] + self.biases[i]))
        return h @ self.weights[-1] + self.biases[-1]


def dropconnect_layer(ps: Sequence[float], per_sample: bool) -> Callable[[int, int, int], nn.Module]:
    """A ``linear`` factory for :func:`mlp`: hidden layer ``i`` is a ``DropConnectLinear`` with p = ``ps[i]``."""
    return lambda i, fan_in, fan_out: DropConnectLinear(fan_in, fan_out, p=ps[i], per_sample=per_sample)


def lenet(
    conv_dropouts: Sequence[float], dense_dropout: float, channels: Sequence[int], hidden: int, scratch: bool
) -> nn.Sequential:
    """LeNet with spatial dropout: (conv 5×5 pad 2 → ReLU → channel dropout → 2×2 max-pool) × 2 → dense → 10.

    Args:
        conv_dropouts: channel-dropout probability after each conv layer (two entries).
        dense_dropout: dropout probability after the hidden dense layer.
        channels: output channels of the two conv layers (20, 50 in the classic net: dense input 50·7·7 = 2450).
        hidden: width of the hidden dense layer (500).
        scratch: use the scratch ``ChannelDropout`` instead of PyTorch's ``Dropout2d`` kernel (the same for
            bf16/fp16 activations, where ``Dropout2d`` runs the scratch kernel too).
    """
    channel_cls = ChannelDropout if scratch else Dropout2d
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, kernel_size=5, padding=2),
        nn.ReLU(),
        channel_cls(conv_dropouts[0]),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, kernel_size=5, padding=2),
        nn.ReLU(),
        channel_cls(conv_dropouts[1]),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, hidden),
        nn.ReLU(),
        Dropout(dense_dropout),
        nn.Linear(hidden, NUM_CLASSES),
    )
