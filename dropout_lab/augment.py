"""Training-set augmentation on whole batches of device-resident uint8 images: random flips and translations.

The random draws of an epoch depend only on ``(seed, epoch)`` (their own stream, apart from the sample order and
the global RNG that drives dropout), so a resumed run augments exactly as an uninterrupted one, and turning
augmentation on does not change the dropout masks' random stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["MAX_SHIFT", "AugmentDraws", "BatchAugment"]

MAX_SHIFT = 14  # half the image side: a larger translation leaves nothing of a 28×28 image


@dataclass
class AugmentDraws:
    """The random choices for a run of samples: ``flips`` (N,) bool, ``shifts`` (N, 2) int64 (rows, cols).

    Stacked draws (:meth:`stack`) have one more axis after N: (N, S) and (N, S, 2).
    """

    flips: torch.Tensor | None
    shifts: torch.Tensor | None

    def to(self, device: torch.device) -> AugmentDraws:
        """The same draws on ``device``."""
        return AugmentDraws(*(None if t is None else t.to(device, non_blocking=True) for t in self._fields()))

    def slice(self, start: int, stop: int) -> AugmentDraws:
        """The draws of samples ``start:stop``."""
        return AugmentDraws(*(None if t is None else t[start:stop] for t in self._fields()))

    def flatten(self) -> AugmentDraws:
        """The draws of stacked rows (N, S, ...) as N·S rows, row-major (the order of ``images.flatten(0, 1)``)."""
        flips = None if self.flips is None else self.flips.reshape(-1)
        shifts = None if self.shifts is None else self.shifts.reshape(-1, 2)
        return AugmentDraws(flips, shifts)

    @staticmethod
    def stack(draws: list[AugmentDraws]) -> AugmentDraws:
        """S runs of draws of N samples each side by side: fields of shape (N, S) and (N, S, 2)."""
        fields = [d._fields() for d in draws]
        return AugmentDraws(*(None if ts[0] is None else torch.stack(ts, dim=1) for ts in zip(*fields, strict=True)))

    def _fields(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.flips, self.shifts


class BatchAugment:
    """Random horizontal flips and zero-padded translations of uint8 image batches (B, H, W).

    Args:
        hflip: mirror each image left-right with probability 1/2.
        max_shift: translate each image by a uniform integer number of pixels in ``[-max_shift, max_shift]``
            along each axis, filling with background (0); 0 = no translation.
    """

    def __init__(self, hflip: bool = False, max_shift: int = 0) -> None:
        if not 0 <= max_shift <= MAX_SHIFT:
            raise ValueError(f"data.max_shift: {max_shift} is not in [0, {MAX_SHIFT}] pixels")
        self.hflip, self.max_shift = hflip, max_shift

    @property
    def active(self) -> bool:
        """Whether this augmentation changes anything."""
        return self.hflip or self.max_shift > 0

    def draw(self, n: int, generator: torch.Generator) -> AugmentDraws:
        """Draw the flips and shifts of ``n`` samples on the CPU from ``generator``."""
        flips = torch.rand(n, generator=generator) < 0.5 if self.hflip else None
        shifts = None
        if self.max_shift:
            shifts = torch.randint(-self.max_shift, self.max_shift + 1, (n, 2), generator=generator)
        return AugmentDraws(flips, shifts)

    def apply(self, images: torch.Tensor, draws: AugmentDraws) -> torch.Tensor:
        """Augment ``images`` (B, H, W), any dtype, with one row of ``draws`` per image (on the same device)."""
        if draws.flips is not None:
            images = torch.where(draws.flips[:, None, None], images.flip(-1), images)
        if draws.shifts is not None:
            s = self.max_shift
            b, h, w = images.shape
            padded = F.pad(images, (s, s, s, s))
            rows = torch.arange(h, device=images.device)[None, :] + s + draws.shifts[:, :1]  # (B, H)
            cols = torch.arange(w, device=images.device)[None, :] + s + draws.shifts[:, 1:]  # (B, W)
            batch = torch.arange(b, device=images.device)[:, None, None]
            images = padded[batch, rows[:, :, None], cols[:, None, :]]
        return images
