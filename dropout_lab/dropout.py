"""The dropout family: functional ops and their ``nn.Module`` twins (timm ``layers/drop.py`` style).

Every noise layer subclasses :class:`StochasticModule`, so MC dropout and the activation-variance callback
find them with :func:`stochastic_modules` / :func:`set_mc`, not with ``isinstance(m, nn.Dropout)``. A layer is
random when ``(training or mc) and has_noise``; otherwise it returns its deterministic expectation (identity
for dropout). Noise is drawn on the input's device and dtype (keep masks from float32 uniforms under bf16 and
fp16: :func:`mask_dtype`); no forward syncs with the host. DropConnect, which drops weights rather than
activations, lives in :mod:`dropout_lab.dropconnect`.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dropout_lab.types import check_probability

__all__ = [
    "HALF_DTYPES",
    "ChannelDropout",
    "Dropout",
    "Dropout2d",
    "GaussianDropout",
    "ScratchDropout",
    "StochasticModule",
    "apply_mask",
    "channel_dropout",
    "check_probability",
    "gaussian_dropout",
    "keep_multiplier",
    "mask_dtype",
    "scratch_dropout",
    "set_mc",
    "stochastic_modules",
    "uniform_like",
]


def _finite(value: object) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)


class StochasticModule(nn.Module):
    """Base of every noise layer: drop probability ``p`` (0 where it means nothing) and the MC switch ``mc``.

    With ``mc = True`` (see :func:`set_mc`) the layer stays random in eval mode (MC dropout).
    """

    p: float = 0.0
    mc: bool = False
    _repr_fields: tuple[str, ...] = ("p",)

    @property
    def has_noise(self) -> bool:
        """Whether the layer injects any noise at all (``p > 0`` unless a subclass says otherwise)."""
        return self.p > 0

    @property
    def stochastic(self) -> bool:
        """Whether the next forward is random: ``(training or mc) and has_noise``."""
        return (self.training or self.mc) and self.has_noise

    def extra_repr(self) -> str:
        """The noise parameters (and ``mc=True`` when set), shown by ``print(model)``."""
        fields = [f"{k}={getattr(self, k)}" for k in self._repr_fields]
        return ", ".join(fields + (["mc=True"] if self.mc else []))


def stochastic_modules(module: nn.Module) -> list[tuple[str, StochasticModule]]:
    """Return ``(qualified name, layer)`` for each :class:`StochasticModule` in ``module`` (itself too)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, StochasticModule)]


def set_mc(module: nn.Module, enabled: bool) -> list[StochasticModule]:
    """Set ``mc`` on every :class:`StochasticModule` in ``module`` and return those layers."""
    layers = [m for _, m in stochastic_modules(module)]
    for m in layers:
        m.mc = bool(enabled)
    return layers


# ---------------------------------------------------------------------------------------------- dropout
HALF_DTYPES = (torch.bfloat16, torch.float16)  # input dtypes whose masks are drawn and scaled in float32


def mask_dtype(t: Tensor) -> torch.dtype:
    """The dtype of the uniform draws behind a keep mask for ``t``: its own if float32/float64, else float32.

    bf16 and fp16 uniforms are too coarse for ``uniform > p``: in bf16 the rate kept at p = 0.5 is 0.496,
    about 8 standard errors from 0.5 at 1M draws, so under mixed precision the masks are drawn in float32.
    """
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def uniform_like(t: Tensor) -> Tensor:
    """``torch.rand_like(t)`` (same shape, device and memory format) in :func:`mask_dtype` ``(t)``."""
    return torch.rand_like(t, dtype=mask_dtype(t))


def keep_multiplier(
    u: Tensor, p: float | Tensor, inclusive: bool = False, scale: float | Tensor | None = None
) -> Tensor:
    """Turn uniforms ``u`` in place into inverted dropout's multiplier: ``1 / (1 - p)`` where kept, else 0.

    Kept means ``u > p`` (``u >= p`` with ``inclusive``, so that p = 0 keeps everything). ``x * m`` equals
    ``x * (u > p) * (1 / (1 - p))`` bit for bit (also in bf16 once rounded back to ``x``'s dtype), and costs one
    multiplication forward and one backward where a boolean mask costs a conversion and two. Saved for the
    backward it takes 4 bytes an element where a boolean mask takes 1.

    Args:
        u: uniforms in [0, 1), overwritten.
        p: drop probability: a float, or a tensor that broadcasts against ``u``.
        inclusive: keep ``u == p`` as well.
        scale: ``1 / (1 - p)`` computed ahead (a layer with a tensor ``p`` keeps it, instead of three ops a call).
    """
    keep = u.ge_(p) if inclusive else u.gt_(p)
    if scale is None:
        scale = 1.0 / (1.0 - (p.to(u.dtype) if isinstance(p, Tensor) else p))
    return keep.mul_(scale)


def apply_mask(x: Tensor, mask: Tensor) -> Tensor:
    """``x * mask`` (a float32/float64 keep multiplier that broadcasts to ``x``), rounded once to ``x``'s dtype.

    For bf16/fp16 ``x`` the product is formed in the mask's dtype: ``x`` is cast up, multiplied in place and cast
    back, bit for bit ``(x * mask).to(x.dtype)`` but without PyTorch's slower mixed-dtype broadcast multiply.
    """
    if x.dtype == mask.dtype:
        return x * mask
    return x.to(mask.dtype).mul_(mask).to(x.dtype)


class _ScratchDropoutFunction(torch.autograd.Function):
    """Inverted dropout with an explicit backward that reuses the forward's keep mask (stored scaled)."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        mask = keep_multiplier(uniform_like(x), p)  # uniform keep mask: P(keep) = 1 - p
        ctx.save_for_backward(mask)
        return apply_mask(x, mask)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return apply_mask(grad, mask), None


def scratch_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout from scratch: keep each element with prob. ``1 - p``, scaled by ``1 / (1 - p)``.

    ``p = 0`` (or ``training=False``) returns ``x``; ``p = 1`` returns zeros (as in the d2l book).
    """
    p = check_probability(p, allow_one=True)
    if not training or p == 0:
        return x
    if p == 1:
        return torch.zeros_like(x)
    return _ScratchDropoutFunction.apply(x, p)


def channel_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Channel-wise inverted dropout from scratch: one keep draw per (sample, channel) of x (N, C, ...)."""
    p = check_probability(p)
    if not training or p == 0:
        return x
    u = torch.rand(x.shape[:2] + (1,) * (x.dim() - 2), device=x.device, dtype=mask_dtype(x))
    return apply_mask(x, keep_multiplier(u, p))


def gaussian_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Gaussian dropout (Srivastava et al. 2014, §10): multiply ``x`` by noise ~ N(1, p / (1 - p))."""
    p = check_probability(p)
    if not training or p == 0:
        return x
    return x * torch.randn_like(x).mul_(math.sqrt(p / (1.0 - p))).add_(1.0)


class _DropModule(StochasticModule):
    """A :class:`StochasticModule` whose only argument is its drop probability.

    Args:
        p: drop probability (0 <= p < 1).
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = check_probability(p)


class ScratchDropout(_DropModule):
    """Inverted dropout through a hand-written autograd function (the d2l "from scratch" layer).

    Args:
        p: probability of zeroing each element (0 <= p < 1).
    """

    def forward(self, x: Tensor) -> Tensor:
        """``x`` with elements dropped and the rest scaled by 1/(1-p); ``x`` itself when not stochastic."""
        return scratch_dropout(x, self.p) if self.stochastic else x


class Dropout(_DropModule):
    """Element-wise dropout through ``F.dropout`` (PyTorch's kernel), as a member of the family.

    With ``uniform_masks = True`` (set by the callback :class:`dropout_lab.speed.UniformDropoutMasks`) it runs
    the kernel of :func:`scratch_dropout` instead: the same inverted dropout with a mask drawn as
    ``uniform > p``, which is cheaper than PyTorch's ``bernoulli_`` on the CPU. It also does so for bf16 and
    fp16 input off CUDA (bf16 autocast on the CPU, as in ``lenet_best.yaml``): PyTorch's CPU kernel rounds the
    scale 1/(1 − p) to the input's dtype (1.0546875 for p = 0.05 in bf16, 0.18 % high); the uniform kernel keeps
    it in float32. CUDA's fused kernel scales in float32 and is kept there.

    Args:
        p: probability of zeroing each element (0 <= p < 1).
    """

    uniform_masks: bool = False

    def forward(self, x: Tensor) -> Tensor:
        """``F.dropout(x, p)`` (or the uniform-mask kernel) when stochastic, also in eval with ``mc``; else ``x``."""
        if not self.stochastic:
            return x
        if self.uniform_masks or (x.dtype in HALF_DTYPES and not x.is_cuda):
            return _ScratchDropoutFunction.apply(x, self.p)
        return F.dropout(x, self.p, training=True)


class Dropout2d(_DropModule):
    """Channel-wise dropout through ``F.dropout2d`` for inputs of shape (N, C, H, W).

    bf16 and fp16 input goes through :func:`channel_dropout` instead (same Bernoulli per channel and scale):
    ``F.dropout2d`` builds its noise in the input's dtype on every device, which rounds 1/(1 − p) (1.0546875 for
    p = 0.05 in bf16); :func:`channel_dropout` keeps the scale in float32.

    Args:
        p: probability of zeroing each whole channel (0 <= p < 1).
    """

    def forward(self, x: Tensor) -> Tensor:
        """``F.dropout2d(x, p)`` (:func:`channel_dropout` for bf16/fp16) when stochastic, also in eval with ``mc``."""
        if not self.stochastic:
            return x
        return channel_dropout(x, self.p) if x.dtype in HALF_DTYPES else F.dropout2d(x, self.p, training=True)


class ChannelDropout(_DropModule):
    """Channel-wise inverted dropout from scratch: one Bernoulli per (sample, channel) of (N, C, ...).

    Args:
        p: probability of zeroing each whole channel (0 <= p < 1).
    """

    def forward(self, x: Tensor) -> Tensor:
        """``x`` with whole channels dropped and the rest scaled by 1/(1-p); ``x`` when not stochastic."""
        return channel_dropout(x, self.p) if self.stochastic else x


class GaussianDropout(_DropModule):
    """Multiplicative Gaussian noise N(1, p / (1 - p)): the mean and variance of inverted dropout.

    Args:
        p: the equivalent drop probability (0 <= p < 1); the noise variance is p / (1 - p).
    """

    def forward(self, x: Tensor) -> Tensor:
        """``x`` times N(1, p/(1-p)) noise when stochastic, else ``x``."""
        return gaussian_dropout(x, self.p) if self.stochastic else x
