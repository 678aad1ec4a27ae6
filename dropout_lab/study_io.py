"""A study's files: ``results.csv`` and ``curves.csv`` (appended as runs finish) and its runs' TensorBoard scalars."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

__all__ = ["CURVE_FIELDS", "RESULT_FIELDS", "append_rows", "read_rows", "read_scalars"]

RESULT_FIELDS = [
    "cell", "seed", "max_epochs", "test_acc", "test_loss", "val_acc", "best_val_acc", "train_acc", "gap",
    "steps", "seconds", "overrides", "finished", "options",
]  # fmt: skip
CURVE_FIELDS = ["cell", "seed", "tag", "step", "value"]


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file written by this module (none if it does not exist)."""
    with path.open(newline="") if path.exists() else open(os.devnull) as f:
        return list(csv.DictReader(f))


def append_rows(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to a CSV file (header first if new) and force them to disk (flush + fsync).

    A file written with fewer columns (by an older version) is first rewritten with ``fields`` as its header (its
    rows empty in the new columns, through a temporary file and a rename), so no column shifts and nothing is lost.
    """
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), fields)
        if header != fields and set(header) <= set(fields):
            old_rows = read_rows(path)
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(old_rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            fields = header
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard run folder (all its event files): ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
