"""The per-cell test table of a :class:`~dropout_lab.population.PopulationMLP`: mean ± std over each cell's members."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from dropout_lab.stats import mean_std

__all__ = ["CellReport", "cell_table"]

_OPTIMIZER_DECAY = "population_optimizer_decay"  # checkpoint key: the optimizer's class and own weight_decay


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


class CellReport:
    """The test's per-cell table of a :class:`~dropout_lab.population.PopulationMLP` (a LightningModule mixin).

    Needs ``hparams.dropouts`` and ``cell_wds`` (each cell's own weight decay); notes the optimizer's own
    ``weight_decay`` when the optimizer is built and keeps it in the checkpoint, for a later ``test``.
    """

    _optimizer_decay: tuple[str, float] | None = None  # (class, weight_decay), set by configure_optimizers

    def cell_table(self, acc: Tensor) -> str:
        """A Markdown table of each cell's accuracy ``acc`` (K,): mean ± sample std over its members, in %."""
        return cell_table(acc, self.hparams.dropouts, self.cell_wds, self._optimizer_decay)

    def configure_optimizers(self) -> Any:
        """The base class's optimizer; its own ``weight_decay`` (Adam's, AdamW's) is noted for :meth:`cell_table`."""
        configured = super().configure_optimizers()
        optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
        self._optimizer_decay = (type(optimizer).__name__, float(optimizer.defaults.get("weight_decay", 0.0)))
        return configured

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the optimizer's own weight decay with the weights, for the table of a later ``test``."""
        checkpoint[_OPTIMIZER_DECAY] = self._optimizer_decay

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the optimizer's weight decay noted by :meth:`on_save_checkpoint` (absent in older files)."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(_OPTIMIZER_DECAY)
        self._optimizer_decay = None if saved is None else (str(saved[0]), float(saved[1]))

    def _report_cells(self, acc: Tensor) -> None:
        """Print the test's :meth:`cell_table` and write it to ``<log_dir>/test_cells.md`` (rank zero)."""
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir  # every rank: log_dir broadcasts
        if not self.trainer.is_global_zero:
            return
        table = self.cell_table(acc)
        path = Path(log_dir) / "test_cells.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table)
        self.print(f"\ntest accuracy per cell, mean ± std over its members c<cell>s<j> (also in {path}):\n{table}")
