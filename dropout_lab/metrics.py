"""``TopOneAccuracy``: the accuracy every classifier logs, as a torchmetrics ``Metric`` with two counters."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

__all__ = ["TopOneAccuracy"]


class TopOneAccuracy(Metric):
    """Fraction of images whose largest logit is at the label.

    The same value as torchmetrics' ``MulticlassAccuracy(num_classes, average="micro")`` (both take the first
    largest logit; tested equal to the last bit), kept as two counters: an update is 5 tensor ops (argmax, ==,
    sum and two in-place adds) instead of its 14. The training step updates it for every (micro-)batch, and on a
    GPU each op is a kernel launch, so this is part of the per-step cost. The counters are summed across DDP
    processes like any torchmetrics state; with no update the value is 0, as torchmetrics reports it.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        """``kwargs``: torchmetrics' ``Metric`` options (``sync_on_compute``, ``dist_sync_on_step`` ...)."""
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Count the batch: ``logits`` (B, C) and integer ``target`` (B,)."""
        self.correct += (logits.argmax(dim=-1) == target).sum()
        self.total += target.numel()

    def compute(self) -> torch.Tensor:
        """Correct / total as float32 (0 before any update)."""
        total = self.total.float()
        return torch.where(total > 0, self.correct.float() / total, torch.zeros_like(total))
