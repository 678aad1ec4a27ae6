"""DropConnect (Wan et al. 2013): a member of the dropout family that drops weights, not activations.

Its layer subclasses :class:`dropout_lab.dropout.StochasticModule` like every noise layer, so MC dropout and the
activation-variance callback find it the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dropout_lab.dropout import StochasticModule, check_probability, mask_dtype

__all__ = ["DropConnectLinear", "dropconnect_linear"]


def _dropconnect(x: Tensor, w: Tensor, b: Tensor | None, p: float, per_sample: bool) -> tuple[Tensor, Tensor]:
    """Return the output and the boolean keep mask: (out, in), or (rows, out, in) per sample."""
    scaled = w * (1.0 / (1.0 - p))
    if not per_sample:
        mask = torch.rand(w.shape, device=w.device, dtype=mask_dtype(w)) > p
        return F.linear(x, torch.where(mask, scaled, 0.0), b), mask
    rows = x.reshape(-1, x.shape[-1])
    mask = torch.rand((rows.shape[0], *w.shape), device=w.device, dtype=mask_dtype(w)) > p
    out = torch.bmm(torch.where(mask, scaled, 0.0), rows.unsqueeze(-1)).squeeze(-1)
    if b is not None:
        out = out + b
    return out.reshape(*x.shape[:-1], w.shape[0]), mask


def dropconnect_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    p: float = 0.5,
    training: bool = True,
    per_sample: bool = False,
) -> Tensor:
    """DropConnect (Wan et al. 2013): ``F.linear`` with each weight kept w.p. 1 - p and scaled by 1/(1-p).

    The bias is never masked. One weight mask per call, or one per row of ``x`` with ``per_sample=True``
    (memory: rows x out x in). ``training=False`` or ``p = 0`` is exactly ``F.linear``.
    """
    p = check_probability(p)
    if not training or p == 0:
        return F.linear(x, weight, bias)
    return _dropconnect(x, weight, bias, p, per_sample)[0]


class DropConnectLinear(nn.Linear, StochasticModule):
    """An ``nn.Linear`` whose weights (not activations) are dropped in training; eval uses the full weights.

    After each stochastic forward, ``last_mask`` holds the boolean keep mask it used ((out, in), or
    (rows, out, in) with ``per_sample``); it is ``None`` before and untouched by deterministic forwards.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        p: probability of dropping each weight (0 <= p < 1).
        bias: whether to learn an additive bias (never masked).
        per_sample: draw one weight mask per row of the batch instead of one per forward.
    """

    _repr_fields = ("p", "per_sample")

    def __init__(
        self, in_features: int, out_features: int, p: float = 0.5, bias: bool = True, per_sample: bool = False
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.p = check_probability(p)
        self.per_sample = per_sample
        self.last_mask: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """``x W'^T + b`` with ``W'`` the masked, rescaled weights when stochastic; ``F.linear`` otherwise."""
        if not self.stochastic:
            return F.linear(x, self.weight, self.bias)
        out, self.last_mask = _dropconnect(x, self.weight, self.bias, self.p, self.per_sample)
        return out

    def extra_repr(self) -> str:
        """``nn.Linear``'s fields, then ``p`` and ``per_sample``."""
        return f"{nn.Linear.extra_repr(self)}, {StochasticModule.extra_repr(self)}"
