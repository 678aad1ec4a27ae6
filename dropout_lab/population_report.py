"""The per-cell test table of a :class:`~dropout_lab.population.PopulationMLP`: mean ± std over each cell's members."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from dropout_lab.stats import mean_std

__all__ = ["cell_table"]


def cell_table(
    acc: Tensor,
    dropouts: Sequence[Sequence[float]],
    weight_decays: Sequence[float],
    optimizer_decay: tuple[str, float] | None = None,
) -> str:
    """A Markdown table of each cell's accuracy: mean ± sample std over its members, in %.

    Args:
        acc: (K,) accuracy per member, cells first (member ``c<cell>s<j>`` at ``cell · members_per_cell + j``).
        dropouts: per cell, its dropout probabilities.
        weight_decays: per cell, its own weight decay (``weight_decays``).
        optimizer_decay: the optimizer's class name and its own ``weight_decay``, which acts on every member on
            top of theirs (e.g. ``("AdamW", 0.01)``); shown in each row when nonzero.
    """
    rows = ["| cell | dropouts | weight decay | members | test acc % (mean ± std) |", "|---|---|---|---|---|"]
    for c, values in enumerate((acc.double() * 100).view(len(dropouts), -1).tolist()):
        mean, std = mean_std(values)
        ps = ", ".join(f"{p:g}" for p in dropouts[c])
        spread = f"{std:.2f}" if len(values) > 1 else "—"  # one member: no spread to report
        decay = f"{weight_decays[c]:g}"
        if optimizer_decay is not None and optimizer_decay[1] != 0:
            decay += f" + {optimizer_decay[0]} {optimizer_decay[1]:g}"  # the optimizer's own, on every member
        rows.append(f"| c{c} | [{ps}] | {decay} | {len(values)} | {mean:.2f} ± {spread} |")
    return "\n".join(rows) + "\n"
