"""Small device tensors on their way to the host without blocking: an async copy to pinned memory + an event."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PendingValues"]


@dataclass
class PendingValues:
    """Variances of one forward, on their way to the host (CUDA: async copy to pinned memory + an event)."""

    kind: str
    step: int
    names: list[str]
    data: Tensor
    event: torch.cuda.Event | None = None

    @classmethod
    def start(cls, kind: str, step: int, values: dict[str, Tensor]) -> PendingValues:
        """Stack ``values`` and, on CUDA, start their copy to pinned host memory."""
        data = torch.stack([v.to(torch.float32) for v in values.values()])
        event = None
        if data.is_cuda:
            host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            host.copy_(data, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            data = host
        return cls(kind, step, list(values), data, event)

    def ready(self) -> bool:
        """Whether the copy has finished (always true on the CPU)."""
        return self.event is None or self.event.query()

    def floats(self) -> list[float]:
        """The values as Python floats (waits for the copy if needed)."""
        if self.event is not None:
            self.event.synchronize()
        return self.data.tolist()
