"""Resuming a study: which (cell, seed) runs are left, and whether the finished rows match the runs to come.

A finished row counts only if its run had the ``max_epochs`` (:func:`expected_epochs`) and the options
(:func:`run_options`) that a run of its cell gets now; otherwise the study stops instead of mixing experiments.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from dropout_lab.studies import Cell, Study, StudyError, run_args

__all__ = ["expected_epochs", "pending", "run_options"]


def _last_option(args: list[str], key: str) -> tuple[int, str | None]:
    """Where the last ``--key=value`` or ``--key value`` in ``args`` is and the value it gives ((-1, None) if none)."""
    at, value = -1, None
    for i, arg in enumerate(args):
        if arg.startswith(f"--{key}="):
            at, value = i, arg.split("=", 1)[1]
        elif arg == f"--{key}" and i + 1 < len(args):
            at, value = i, args[i + 1]
    return at, value


def expected_epochs(study: Study, cell: Cell, extra: Sequence[str] = ()) -> str | None:
    """``trainer.max_epochs`` of a run of ``cell``: from its arguments (:func:`run_args`), else its config file.

    None when neither says, or when a config file merged after the base config (a second ``--config``, a
    ``--trainer`` file) comes after the last ``--trainer.max_epochs`` (that file may set it), or the config
    includes one: then the rows are not checked.
    """
    args = run_args(study, cell, 0, Path("."), list(extra))
    at, value = _last_option(args, "trainer.max_epochs")
    files = ("--config", "--trainer")
    merged = [i for i, a in enumerate(args) if a in files or a.startswith(tuple(f"{f}=" for f in files))]
    if any(i > at for i in merged[1:]):  # the first is the base (or the cell's) config, read below
        return None
    if value is None:
        try:
            config = yaml.safe_load(Path(cell.overrides.get("config", study.base)).read_text())
            value = config["trainer"]["max_epochs"]
        except (OSError, yaml.YAMLError, TypeError, KeyError):
            return None
    try:
        return str(int(str(value)))
    except ValueError:
        return None


# run options that do not change what a run is: left out of the ``options`` a results row records
_NEUTRAL_OPTIONS = ("--data.data_dir", "--data.init_args.data_dir", "--trainer.enable_progress_bar",
                    "--trainer.enable_model_summary", "--trainer.accelerator", "--trainer.devices",
                    "--data.num_workers", "--data.init_args.num_workers")  # fmt: skip


def run_options(study: Study, extra: Sequence[str] = ()) -> str:
    """The options every run of the study gets (its ``args``, then those after ``--``), as ``results.csv`` has them.

    JSON of ``{"--key": value}``, each key's last value (the one that wins; ``--k v`` and ``--k=v`` alike); the
    files of ``--config`` and the items of ``--key+=item`` as lists, in order. Left out: the options that do not
    change what a run is (the data folder, the device, loader workers, the progress bar).
    """
    args, options, i = [*study.args, *extra], {}, 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--"):
            arg, i = f"{arg}={args[i + 1]}", i + 1
        key, _, value = arg.partition("=")
        if key not in _NEUTRAL_OPTIONS:
            if key == "--config" or key.endswith("+"):
                options.setdefault(key, []).append(value)
            else:
                options[key] = value
        i += 1
    return json.dumps(options, sort_keys=True)


def _options_differ(recorded: str, now: str) -> str:
    """The keys whose values differ between two :func:`run_options` records, as ``--key: a → b``."""
    try:
        old = json.loads(recorded)
    except json.JSONDecodeError:
        old = {}
    new = json.loads(now)
    if not isinstance(old, dict):
        return f"{recorded} → {now}"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k, '(not given)')} → {new.get(k, '(not given)')}" for k in keys)


def pending(study: Study, done_rows: list[dict[str, str]], extra: Sequence[str] = ()) -> list[tuple[Cell, int]]:
    """The (cell, seed) pairs of ``study`` that have no row in ``done_rows`` yet, seeds outermost.

    Raises:
        StudyError: a finished row of a cell has another ``max_epochs`` than a run of that cell would now get
            (from ``--epochs``, the study's ``epochs``, its arguments or the cell's config file), or was run with
            other options (:func:`run_options`; rows of versions that did not record them are not checked).
    """
    options = run_options(study, extra)
    for row in done_rows:
        differ = _options_differ(row["options"], options) if row.get("options") else ""
        if differ:
            raise StudyError(
                f"{study.out / 'results.csv'} holds runs made with other options than these runs get "
                f"({row['cell']} seed {row['seed']}: {differ}); pass the same options (the study's args and those "
                "after --), or another --out"
            )
    for cell in study.cells:
        expected = expected_epochs(study, cell, extra)
        other = sorted({r["max_epochs"] for r in done_rows if r["cell"] == cell.name} - {expected})
        if expected is not None and other:
            msg = f"{study.out / 'results.csv'} holds runs of max_epochs {', '.join(other)}, not {expected}"
            raise StudyError(f"{msg} (cell {cell.name}); pass that --epochs or another --out")
    done = {(r["cell"], int(r["seed"])) for r in done_rows}
    return [(c, s) for s in study.seeds for c in study.cells if (c.name, s) not in done]
