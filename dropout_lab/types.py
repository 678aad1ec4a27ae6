"""Argument types shared by the modules: validated at parse time by jsonargparse, and again in Python."""

from __future__ import annotations

import math
from collections.abc import Sequence

from jsonargparse.typing import restricted_number_type

__all__ = ["Probability", "check_probabilities", "check_probability"]

Probability = restricted_number_type(
    "Probability", float, [(">=", 0), ("<", 1)], docstring="a dropout probability p with 0 ≤ p < 1"
)


def check_probability(p: float, name: str = "p") -> float:
    """Return ``float(p)``, or raise ``ValueError`` naming ``name`` unless 0 ≤ p < 1."""
    if not (isinstance(p, (int, float)) and math.isfinite(p) and 0 <= p < 1):
        raise ValueError(f"{name} must satisfy 0 <= p < 1, got {p!r}")
    return float(p)


def check_probabilities(hidden_sizes: Sequence[int], dropouts: Sequence[float], input_dropout: float = 0.0) -> None:
    """Check one valid p per hidden layer (and the input p); raise ``ValueError`` naming the key."""
    if len(dropouts) != len(hidden_sizes):
        raise ValueError(
            f"model.dropouts: {len(dropouts)} values for {len(hidden_sizes)} hidden layers "
            f"(model.hidden_sizes={list(hidden_sizes)}); give one p per hidden layer"
        )
    for i, p in enumerate(dropouts):
        check_probability(p, f"model.dropouts[{i}]")
    check_probability(input_dropout, "model.input_dropout")
