"""Argument types shared by the modules: validated at parse time by jsonargparse, and again in Python."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from jsonargparse.typing import restricted_number_type

__all__ = ["Probability", "check_probabilities", "check_probability"]

Probability = restricted_number_type(
    "Probability", float, [(">=", 0), ("<", 1)], docstring="a dropout probability p with 0 ≤ p < 1"
)


def check_probability(p: float, name: str = "p", *, allow_one: bool = False) -> float:
    """Return ``float(p)``; raise ``ValueError`` naming ``name`` unless 0 ≤ p < 1 (p ≤ 1 with ``allow_one``)."""
    finite = isinstance(p, numbers.Real) and math.isfinite(p)
    if not (finite and p >= 0 and (p <= 1 if allow_one else p < 1)):
        raise ValueError(f"{name} must satisfy 0 <= {name} {'<=' if allow_one else '<'} 1, got {p}")
    return float(p)


def check_probabilities(
    layers: Sequence[int],
    dropouts: Sequence[float],
    extra: float = 0.0,
    key: str = "model.dropouts",
    per: str = "hidden layer",
    extra_key: str = "model.input_dropout",
) -> None:
    """Check one valid p per layer (and one extra p); raise ``ValueError`` naming the key.

    Args:
        layers: the layer sizes the probabilities belong to (only their count matters).
        dropouts: one probability per layer.
        extra: one more probability to check (input dropout, dense dropout).
        key: the config key of ``dropouts``, for the message.
        per: what one entry of ``layers`` is, for the message.
        extra_key: the config key of ``extra``.
    """
    if len(dropouts) != len(layers):
        raise ValueError(
            f"{key}: {len(dropouts)} values for {len(layers)} {per}s ({list(layers)}); give one p per {per}"
        )
    for i, p in enumerate(dropouts):
        check_probability(p, f"{key}[{i}]")
    check_probability(extra, extra_key)
