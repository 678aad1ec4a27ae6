"""Studies: a grid of config overrides × seeds, every run a normal ``fit`` + ``test`` of :class:`DropoutLabCLI`.

``python -m dropout_lab study --config configs/studies/swap.yaml`` runs each (cell, seed) through the CLI
(:mod:`dropout_lab.study_runner`; ``--jobs N`` runs N at once), appends its metrics to ``results.csv`` and
curves to ``curves.csv`` as it finishes (a killed study resumes by skipping finished pairs), then writes table
and figure (:mod:`dropout_lab.study_report`). Study file
keys: ``base``, ``grid`` (dotted key → values) or ``cells`` (name → overrides; ``config`` swaps the base config),
``seeds`` (count or list); optional ``name``, ``out``, ``epochs``, ``baseline``, ``compare`` (pairs of cells),
``figure``, ``args`` (CLI options for every run), ``test_every_epoch`` (test every epoch's checkpoint too).
``--population`` trains the cells × seeds as one run instead (:mod:`dropout_lab.study_population`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dropout_lab import study_report as report

__all__ = ["Cell", "Study", "StudyError", "expand_grid", "load_study", "main", "run_args"]

FIGURES = ("bar", "curves", "variance", "heatmap", "test_error")
_KEYS = {"name", "base", "grid", "cells", "seeds", "epochs", "baseline", "compare", "figure", "args", "out",
         "test_every_epoch"}  # fmt: skip
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._=+,-]+$")
MIN_SEEDS = 3


class StudyError(ValueError):
    """A mistake in a study file or the study's arguments; the message names the key or file."""


@dataclass
class Cell:
    """One point of the grid: a name (used for folders and tables) and its CLI overrides (dotted key → value)."""

    name: str
    overrides: dict[str, Any]


@dataclass
class Study:
    """A parsed study file (see the module docstring for the keys)."""

    name: str
    base: str
    cells: list[Cell]
    seeds: list[int]
    out: Path
    epochs: int | None = None
    baseline: str = ""
    compare: list[tuple[str, str]] = field(default_factory=list)
    figure: str = "bar"
    args: list[str] = field(default_factory=list)
    test_every_epoch: bool = False


def expand_grid(grid: dict[str, list[Any]]) -> list[Cell]:
    """Cells of the product of ``grid``'s value lists (first key varies slowest), named ``key=value+key=value``."""
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise StudyError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
    short = report.short_keys(list(grid))
    cells = []
    for combo in itertools.product(*grid.values()):
        overrides = dict(zip(grid, combo, strict=True))
        name = "+".join(f"{short[k]}={report.format_value(v, k)}" for k, v in overrides.items())
        cells.append(Cell(name, overrides))
    return cells


def _seeds(value: Any, source: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(set(value)) != len(value):
            raise StudyError(f"{source}: seeds repeat: {value}")
        return list(value)
    raise StudyError(f"{source}: expected a positive count or a list of integer seeds, got {value!r}")


def load_study(path: str | Path, out: str | Path | None = None) -> Study:
    """Read and check a study file; ``out`` replaces its output folder (default ``results/studies/<name>``)."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise StudyError(f"--config: cannot read study file {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(spec, dict) or "base" not in spec or ("grid" in spec) == ("cells" in spec):
        raise StudyError(f"{path}: needs `base` and exactly one of `grid` or `cells`")
    if set(spec) - _KEYS:
        raise StudyError(f"{path}: unknown key(s) {', '.join(sorted(set(spec) - _KEYS))}; known: {sorted(_KEYS)}")
    if "grid" in spec:
        if not isinstance(spec["grid"], dict) or not spec["grid"]:
            raise StudyError(f"{path}: grid: expected a mapping of dotted keys to lists of values")
        cells = expand_grid(spec["grid"])
    elif isinstance(spec["cells"], dict) and all(isinstance(v, dict) for v in spec["cells"].values()):
        cells = [Cell(str(k), dict(v)) for k, v in spec["cells"].items()]
    else:
        raise StudyError(f"{path}: cells: expected a mapping of cell name to a mapping of overrides")
    names = [c.name for c in cells]
    bad = [n for n in names if not _SAFE_NAME.match(n)] + [n for n in set(names) if names.count(n) > 1]
    if bad:
        raise StudyError(
            f"{path}: cell name {bad[0]!r} is repeated or uses characters other than letters, digits, ._=+,-"
        )
    name = str(spec.get("name", path.stem))
    compare = [tuple(pair) for pair in spec.get("compare", [])]
    study = Study(
        name=name,
        base=str(spec["base"]),
        cells=cells,
        seeds=_seeds(spec.get("seeds", 5), f"{path}: seeds"),
        out=Path(out if out is not None else spec.get("out", f"results/studies/{name}")),
        epochs=spec.get("epochs"),
        baseline=str(spec.get("baseline", names[0])),
        compare=compare,  # type: ignore[arg-type]
        figure=str(spec.get("figure", "bar")),
        args=[str(a) for a in spec.get("args", [])],
        test_every_epoch=bool(spec.get("test_every_epoch", False)),
    )
    if any(len(pair) != 2 for pair in compare):
        raise StudyError(f"{path}: compare: expected pairs of cell names")
    for cell in [study.baseline, *itertools.chain(*compare)]:
        if cell not in names:
            raise StudyError(f"{path}: baseline/compare: no cell named {cell!r}; cells: {', '.join(names)}")
    if study.figure not in FIGURES:
        raise StudyError(f"{path}: figure: {study.figure!r} is not one of {', '.join(FIGURES)}")
    if study.figure == "heatmap" and len(spec.get("grid") or {}) != 2:
        raise StudyError(f"{path}: figure: heatmap needs a `grid` of exactly two keys (rows × columns)")
    return study


def run_args(study: Study, cell: Cell, seed: int, logdir: Path, extra: list[str] = ()) -> list[str]:  # type: ignore[assignment]
    """The ``fit`` arguments of one run: base config, study args, ``extra``, the cell's overrides, then seed/logger."""
    config = cell.overrides.get("config", study.base)
    args = ["fit", "--config", str(config), "--test_after_fit=true", *study.args, *extra]
    args += [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in cell.overrides.items() if k != "config"]
    if study.epochs is not None:
        args.append(f"--trainer.max_epochs={study.epochs}")
    if study.test_every_epoch:
        args += ["--checkpoint.save_top_k=-1", "--checkpoint.filename=epoch{epoch:02d}"]
    return [
        *args,
        f"--seed_everything={seed}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.logger.class_path=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={logdir / study.name}",
        f"--trainer.logger.init_args.name={cell.name}",
        f"--trainer.logger.init_args.version=seed{seed}",
        "--trainer.logger.init_args.default_hp_metric=false",
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dropout_lab study",
        description="Run a study (a grid of config overrides × seeds, each run a `fit` + test of the best "
        "checkpoint), appending to <out>/results.csv as runs finish (rerun to resume), then write <out>/<name>.md "
        "(mean ± std per cell, Welch's t-tests) and <out>/<name>.png. Options after `--` go to every run.",
        allow_abbrev=False,
    )
    parser.error = lambda message: sys.exit(print(f"error: {message}", file=sys.stderr) or 2)  # type: ignore[method-assign]
    add = parser.add_argument
    add("--config", required=True, help="the study file (YAML), e.g. configs/studies/swap.yaml")
    add("--out", help="output folder (default: the file's `out`, else results/studies/<name>)")
    add("--logdir", default="lightning_logs/studies",
        help="TensorBoard root: <logdir>/<name>/<cell>/seed<k> (default: lightning_logs/studies)")  # fmt: skip
    add("--seeds", type=int, nargs="+", help="seeds to run instead of the file's (e.g. 0 1 2)")
    add("--epochs", type=int, help="trainer.max_epochs of every run (default: the file's, else the config's)")
    add(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each in its own process with 1/jobs of the CPU "
        "threads (or sharing the GPU); default 1: one after the other in this process",
    )
    add("--dry_run", action="store_true", help="list the runs still to do, with their arguments, and stop")
    add("--keep_checkpoints", action="store_true", help="keep each run's checkpoints (default: deleted once recorded)")
    add(
        "--population",
        action="store_true",
        help="train all cells × seeds as the members of ONE PopulationMLP run (stacked weights, batched matmuls, "
        "one process) instead of separate runs: for DropoutMLP studies whose cells vary only "
        "model.init_args.dropouts and the SGD weight_decay (swap, weight_decay); each member starts from its seed's "
        "initial weights and trains on its seed's data order, as a separate run does, and the members share one "
        "stream of dropout draws",
    )
    return parser


def _print_error(err: Exception) -> None:
    """``error: <err>`` on stderr, then the notes added to it (other runs that failed meanwhile), one per line."""
    print(f"error: {err}", *getattr(err, "__notes__", []), sep="\n", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m dropout_lab study``; mistakes end with one ``error:`` line and exit code 2.

    A run that diverges ends the study with one ``error:`` line naming its cell and seed and exit code 3 (as
    ``fit`` does); the finished runs' rows stay in ``results.csv``. With ``--jobs``, runs that fail while it
    ends follow as ``also failed:`` lines.
    """
    from dropout_lab.reliability import DivergenceError

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    opts = _parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    try:
        study = load_study(opts.config, opts.out)
        if opts.seeds is not None:
            study.seeds = _seeds(opts.seeds, "--seeds")
        if opts.epochs is not None and opts.epochs < 1:
            raise StudyError(f"--epochs: expected a positive integer, got {opts.epochs}")
        study.epochs = opts.epochs or study.epochs
        if opts.jobs < 1:
            raise StudyError(f"--jobs: expected a positive integer, got {opts.jobs}")
        if opts.population and opts.jobs > 1:
            raise StudyError("--jobs: a --population study is one run in one process; drop --jobs")
        from dropout_lab.study_runner import run_study

        run_study(study, Path(opts.logdir), extra, opts.dry_run, opts.keep_checkpoints, opts.jobs, opts.population)
    except StudyError as err:
        _print_error(err)
        sys.exit(2)
    except DivergenceError as err:
        _print_error(err)
        sys.exit(3)
