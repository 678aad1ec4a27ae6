"""Calibration of predicted class probabilities: accuracy, NLL, Brier score, ECE and reliability bins."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ReliabilityBins", "calibration_metrics", "entropy", "reliability_bins"]


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats along ``dim``, with 0 log 0 = 0."""
    return -torch.xlogy(probs, probs).sum(dim)


def calibration_metrics(probs: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL, Brier score, ECE, mean confidence and mean entropy of predicted probabilities.

    Args:
        probs: (N, C) class probabilities (rows summing to 1).
        targets: (N,) true classes.
        n_bins: equal-width confidence bins of the ECE (L1 norm), the bins of :func:`reliability_bins`, so the
            printed ECE is the one in the reliability diagram's title.

    Returns:
        ``accuracy``; ``nll`` = mean −log p(target) (p clamped at 1e-12); ``brier`` = mean Σ_c (p_c − 1[c=y])²
        (0 to 2); ``ece``; ``confidence`` = mean max p; ``entropy`` = mean predictive entropy (nats).
    """
    ece = reliability_bins(probs, targets, n_bins).ece  # binned in the probabilities' own precision, as plotted
    probs = probs.detach().to(torch.float64).clamp(0.0, 1.0)
    targets = targets.to(probs.device).long()
    confidence, predicted = probs.max(dim=-1)
    onehot = F.one_hot(targets, probs.shape[-1]).to(probs.dtype)
    return {
        "accuracy": (predicted == targets).double().mean().item(),
        "nll": -probs.gather(1, targets[:, None]).clamp_min(1e-12).log().mean().item(),
        "brier": (probs - onehot).square().sum(-1).mean().item(),
        "ece": ece,
        "confidence": confidence.mean().item(),
        "entropy": entropy(probs).mean().item(),
    }


@dataclass
class ReliabilityBins:
    """Equal-width confidence bins for a reliability diagram.

    Attributes:
        edges: (n_bins + 1,) bin edges from 0 to 1; bin i holds confidences in [edges[i], edges[i+1]),
            the last bin also confidence 1.
        confidence: (n_bins,) mean confidence in each bin (NaN where empty).
        accuracy: (n_bins,) fraction of correct predictions in each bin (NaN where empty).
        count: (n_bins,) predictions in each bin.
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor

    @property
    def ece(self) -> float:
        """Expected calibration error of these bins: Σ (count / N) |accuracy − confidence|."""
        gap = (self.accuracy - self.confidence).abs().nan_to_num(0.0)
        return float((gap * self.count).sum() / self.count.sum().clamp_min(1))


def reliability_bins(probs: Tensor, targets: Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Per-bin mean confidence, accuracy and count of the top-class predictions (tensors on the CPU).

    Args:
        probs: (N, C) class probabilities.
        targets: (N,) true classes.
        n_bins: number of equal-width confidence bins over [0, 1].
    """
    probs, targets = probs.detach().cpu(), targets.detach().cpu().long()
    probs = probs.to(torch.promote_types(probs.dtype, torch.float32))
    confidence, predicted = probs.max(dim=-1)
    # edges in at least float32, as torchmetrics bins (bf16 edges would move the bins); a confidence of exactly 1
    # (a float32 softmax with a logit gap above ~17) goes to the last bin, where torchmetrics' ECE gives it a bin
    # of its own
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    confidence = confidence.to(torch.float64)
    count = torch.bincount(index, minlength=n_bins).to(torch.float64)
    conf_sum = torch.bincount(index, weights=confidence, minlength=n_bins)
    correct = torch.bincount(index, weights=(predicted == targets).double(), minlength=n_bins)
    empty = count == 0
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return ReliabilityBins(
        edges=edges.to(torch.float64),
        confidence=torch.where(empty, nan, conf_sum / count.clamp_min(1)),
        accuracy=torch.where(empty, nan, correct / count.clamp_min(1)),
        count=count.long(),
    )
