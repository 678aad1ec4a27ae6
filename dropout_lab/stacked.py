"""The layers of a :class:`dropout_lab.population.PopulationMLP`: K members' weights and dropout, stacked.

Both take and return (K, B, features) tensors, member k in slice k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dropout_lab.dropout import StochasticModule, apply_mask, keep_multiplier, uniform_like
from dropout_lab.types import check_probability

__all__ = ["MemberDropout", "StackedLinear", "linear_init", "member_generators"]


def linear_init(in_features: int, out_features: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Weight (out, in) and bias (out,) drawn from ``generator`` as ``nn.Linear.reset_parameters`` draws them."""
    weight, bias = torch.empty(out_features, in_features), torch.empty(out_features)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
    nn.init.uniform_(bias, -bound, bound, generator=generator)
    return weight, bias


def member_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per member, seeded as ``torch.manual_seed(seed)`` seeds the global one."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


class StackedLinear(nn.Module):
    """K independent linear layers applied to K stacked inputs (K, B, in) → (K, B, out) with one ``baddbmm``.

    Member k draws its weight and then its bias from ``generators[k]`` exactly as ``nn.Linear.reset_parameters``
    draws them from the global generator, so layers built in order from generators seeded with s hold the
    weights of an MLP of ``nn.Linear`` layers built after ``torch.manual_seed(s)`` (what a run of seed s has).

    Args:
        in_features: input width.
        out_features: output width.
        generators: one CPU generator per member (K of them), consumed in order.
    """

    def __init__(self, in_features: int, out_features: int, generators: Sequence[torch.Generator]) -> None:
        super().__init__()
        members = len(generators)
        weight, bias = torch.empty(members, in_features, out_features), torch.empty(members, 1, out_features)
        for k, g in enumerate(generators):
            w, b = linear_init(in_features, out_features, g)
            weight[k].copy_(w.T)
            bias[k, 0].copy_(b)
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        """(K, B, in) → (K, B, out)."""
        return torch.baddbmm(self.bias, x, self.weight)

    def load_linear(self, k: int, linear: nn.Linear) -> None:
        """Copy an ``nn.Linear``'s weights into member ``k``."""
        with torch.no_grad():
            self.weight[k].copy_(linear.weight.T)
            self.bias[k, 0].copy_(linear.bias)


class MemberDropout(StochasticModule):
    """Inverted dropout with one probability per member: input (K, B, F), ``p`` a (K,) buffer.

    Args:
        p: drop probability of each member (0 ≤ p < 1).
    """

    _repr_fields = ("p_list",)

    def __init__(self, p: Sequence[float]) -> None:
        super().__init__()
        for value in p:
            check_probability(value, "dropouts")
        self.p = max(float(v) for v in p)  # the family's scalar p: > 0 iff any member drops
        self.p_list = [float(v) for v in p]
        self.register_buffer("probs", torch.empty(0), persistent=False)
        self.register_buffer("scales", torch.empty(0), persistent=False)
        self._set_buffers(torch.float32, None)

    def _set_buffers(self, dtype: torch.dtype, device: torch.device | None) -> None:
        """``probs`` and ``scales = 1 / (1 − p)`` from the exact floats, in the masks' dtype (float32 or float64)."""
        probs = torch.tensor(self.p_list, dtype=torch.float64)
        self.probs = probs.to(dtype=dtype, device=device)
        self.scales = (1.0 / (1.0 - probs)).to(dtype=dtype, device=device)  # correctly rounded

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MemberDropout:
        """``.to()``, ``.half()``, ``.cuda()``…: buffers follow the device; not a half dtype (bf16-true, 16-true).

        The masks are drawn in float32 (float64 for float64 input), so ``p`` and its scale stay in that dtype: a
        bf16 p = 0.1 would drop 0.10009765625 of the units and scale them by 1.109375 instead of 1.111….
        """
        before = (self.probs.dtype, self.probs.device)
        super()._apply(fn, recurse)
        if (self.probs.dtype, self.probs.device) != before:  # a no-op .to() keeps the same tensors (CUDA graphs)
            dtype = torch.float64 if self.probs.dtype == torch.float64 else torch.float32
            self._set_buffers(dtype, self.probs.device)  # also refills them after meta → to_empty
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Each member's activations dropped with its own p and scaled by 1 / (1 − p)."""
        if not self.stochastic:
            return x
        shape = (-1, *([1] * (x.dim() - 1)))
        keep = keep_multiplier(uniform_like(x), self.probs.view(shape), True, self.scales.view(shape))
        return apply_mask(x, keep)
