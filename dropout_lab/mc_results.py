"""The summaries of T stochastic passes (``MCResult``), computed from samples or streamed over chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dropout_lab.calibration import entropy

__all__ = ["MCResult", "summarize_logits"]

_FLUSH_ELEMENTS = 2**20  # logits buffered by the MC accumulator before one reduction


@dataclass
class MCResult:
    """Summaries of T stochastic passes over N inputs with C classes (all in nats).

    Attributes:
        mean_probs: (N, C) predictive mean (1/T) sum_t softmax(logits_t).
        mean_logits: (N, C) mean of the logits over the passes.
        predictive_entropy: (N,) H[mean_probs], the total uncertainty.
        expected_entropy: (N,) (1/T) sum_t H[p_t], the aleatoric part.
        mutual_information: (N,) predictive − expected entropy (BALD, the epistemic part), clamped at 0.
        variance: (N, C) variance of each class probability across the passes (divided by T).
        T: number of passes.
        probs: (T, N, C) the per-pass probabilities, only when samples were asked for.
        logits: (T, N, C) the per-pass logits, only when samples were asked for.
    """

    mean_probs: Tensor
    mean_logits: Tensor
    predictive_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    variance: Tensor
    T: int
    probs: Tensor | None = None
    logits: Tensor | None = None

    @property
    def predictions(self) -> Tensor:
        """(N,) the class of highest predictive mean."""
        return self.mean_probs.argmax(dim=-1)


def summarize_logits(logits: Tensor, return_samples: bool = False) -> MCResult:
    """Summaries of stacked pass logits (T, N, C), computed directly from the samples (float64 inside).

    Summaries come back in the logits' dtype, but at least float32: bf16 mean probabilities would not sum to 1
    within 0.003 and would tie argmaxes.

    Args:
        logits: the logits of T passes over N inputs.
        return_samples: keep ``probs`` and ``logits`` (T, N, C) in the result.
    """
    out = torch.promote_types(logits.dtype, torch.float32)  # summaries: never rounded to a half type
    lp = logits.double().log_softmax(dim=-1)
    probs = lp.exp()
    mean_probs = probs.mean(0)
    predictive = entropy(mean_probs)
    expected = -(probs * lp).sum(-1).mean(0)
    return MCResult(
        mean_probs=mean_probs.to(out),
        mean_logits=logits.double().mean(0).to(out),
        predictive_entropy=predictive.to(out),
        expected_entropy=expected.to(out),
        mutual_information=(predictive - expected).clamp_min(0).to(out),
        variance=probs.var(0, correction=0).to(out),
        T=logits.shape[0],
        probs=probs.to(out) if return_samples else None,
        logits=logits if return_samples else None,
    )


class _Accumulator:
    """Running sums, per input, of p, p², logits and per-pass entropy over blocks of (passes, inputs).

    One (N, 3C + 1) float64 tensor. Blocks of logits are buffered (up to ``_FLUSH_ELEMENTS``) and reduced
    together, so the summary costs a few kernel launches per ~1M logits, not per forward.
    """

    def __init__(self, n: int, total_passes: int | None = None) -> None:
        self.n, self.total_passes, self.passes = n, total_passes, 0
        self.sums: Tensor | None = None
        self.samples: Tensor | None = None
        self.dtype = torch.float32
        self.buffer: dict[tuple[int, int], list[Tensor]] = {}  # (n0, rows) -> blocks (k, rows, C)
        self.buffered = 0

    def update(self, t0: int, n0: int, logits: Tensor) -> None:
        """Add the block ``logits`` (k passes, n inputs, C) for passes ``t0:t0+k`` of inputs ``n0:n0+n``."""
        k, rows, classes = logits.shape
        if self.sums is None:
            self.dtype = torch.promote_types(logits.dtype, torch.float32)  # summaries: never rounded to a half type
            self.sums = torch.zeros(self.n, 3 * classes + 1, device=logits.device, dtype=torch.float64)
            if self.total_passes is not None:
                self.samples = logits.new_empty((self.total_passes, self.n, classes))
        if self.samples is not None:
            self.samples[t0 : t0 + k, n0 : n0 + rows] = logits
        self.buffer.setdefault((n0, rows), []).append(logits)
        self.buffered += logits.numel()
        if self.buffered >= _FLUSH_ELEMENTS:
            self._flush()

    def _flush(self) -> None:
        assert self.sums is not None
        for (n0, rows), blocks in self.buffer.items():
            z = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
            # float64 from the start: for a confident input (p ≈ 0.9998) the variance E[p²] − E[p]² and the
            # mutual information are differences far below float32's resolution of p
            z = z.double()
            lp = z.log_softmax(dim=-1)
            p = lp.exp()
            stats = torch.cat([p, p * p, z, (p * lp).sum(-1, keepdim=True).neg_()], dim=-1)
            self.sums[n0 : n0 + rows] += stats[0] if len(stats) == 1 else stats.sum(0)
        self.buffer, self.buffered = {}, 0

    def result(self) -> MCResult:
        """The summaries of the ``self.passes`` passes added so far."""
        assert self.sums is not None, "no pass was run"
        self._flush()
        T, classes = self.passes, (self.sums.shape[1] - 1) // 3
        mean_probs, mean_p2, mean_logits, expected = (self.sums / T).split([classes, classes, classes, 1], dim=1)
        predictive, expected = entropy(mean_probs), expected.squeeze(1)
        logits = self.samples
        return MCResult(
            mean_probs=mean_probs.to(self.dtype),
            mean_logits=mean_logits.to(self.dtype),
            predictive_entropy=predictive.to(self.dtype),
            expected_entropy=expected.to(self.dtype),
            mutual_information=(predictive - expected).clamp_min(0).to(self.dtype),
            variance=(mean_p2 - mean_probs.square()).clamp_min(0).to(self.dtype),
            T=T,
            probs=None if logits is None else logits.to(self.dtype).softmax(dim=-1),
            logits=logits,
        )
