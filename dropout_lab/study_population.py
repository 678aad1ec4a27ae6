"""``study --population``: a study's cells × seeds trained as the members of one :class:`PopulationMLP` run.

A study of the d2l MLP whose cells differ only in their per-layer dropout rates and SGD weight decay (the swap and
weight-decay studies) becomes one ``fit`` of :class:`dropout_lab.population.PopulationMLP`: one member per (cell,
seed), stacked weights, batched matmuls, in one process. The generated config is written to
``<out>/population.yaml``; each member's results become the same ``results.csv`` / ``curves.csv`` rows a separate
run writes, so the tables and figures are made as for any study.

Each member sees the training order of its seed (``data.shuffle_seeds``: the batches a separate run of that seed
gets); with a fixed ``data.shuffle_seed`` all members share that order, as such runs do, and with ``loader:
torch`` they share the first seed's order. Member ``c<cell>s<j>`` starts from the weights of a separate run of
the j-th seed (:class:`~dropout_lab.stacked.StackedLinear` draws them as ``nn.Linear`` does under
``seed_everything``), so every cell of one seed starts from the same weights, as with separate runs. What differs
from separate runs (and is stated in the report): the members share one stream of dropout draws
(``seed_everything`` = the first seed); without dropout a member reproduces its separate run up to rounding.
A run's ``seconds`` is its share (1/K) of the population's wall time.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from dropout_lab import study_report as report
from dropout_lab.studies import Cell, Study, StudyError, run_args
from dropout_lab.study_resume import run_options

__all__ = ["population_cells", "population_config", "run_population"]

MLP = "dropout_lab.models.DropoutMLP"
DROPOUTS = "model.init_args.dropouts"
WEIGHT_DECAY = "model.init_args.optimizer.init_args.weight_decay"
# DropoutMLP arguments a population cannot vary or express, with the only value it accepts (their defaults)
_FIXED = {"input_dropout": 0.0, "activation": "relu", "lr_scheduler": None}
_CALLBACKS_DROPPED = ("ActivationVarianceMonitor",)  # its per-unit batch statistics would mix the K members


def _base_config(study: Study) -> dict[str, Any]:
    try:
        config = yaml.safe_load(Path(study.base).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise StudyError(f"--population: cannot read base config {study.base}: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise StudyError(f"--population: base config {study.base} has no `model` mapping")
    return config


def population_cells(study: Study, todo: list[tuple[Cell, int]]) -> list[Cell]:
    """The cells of ``todo``, each needing all of the study's seeds (a population is cells × seeds, rectangular)."""
    cells = [c for c in study.cells if any(c is cell for cell, _ in todo)]
    for cell in cells:
        missing = {seed for c, seed in todo if c is cell}
        if missing != set(study.seeds):
            done = sorted(set(study.seeds) - missing)
            raise StudyError(
                f"--population: cell {cell.name} has finished seeds {done} in {study.out / 'results.csv'} and "
                f"lacks {sorted(missing)}; finish it without --population, or pass another --out"
            )
    return cells


def _data_args(config: dict[str, Any]) -> dict[str, Any]:
    """The data module's arguments in ``config`` (plain or ``class_path``/``init_args`` form), created if absent."""
    data = config.get("data") or {}
    config["data"] = data
    return data.setdefault("init_args", {}) if "class_path" in data else data


def _data_orders(config: dict[str, Any], extra: list[str]) -> str:
    """How the members' training orders were chosen, for the report: per seed, shared, or by the run's arguments."""
    if any(arg.startswith(("--data.shuffle_seeds", "--data.init_args.shuffle_seeds")) for arg in extra):
        return "set by the run's arguments"
    return "per seed" if _data_args(config).get("shuffle_seeds") else "shared"


def _is_sgd(class_path: object) -> bool:
    """Whether an optimizer ``class_path`` (``torch.optim.SGD``, ``SGD``, ``torch.optim.sgd.SGD``, a subclass) is SGD.

    Raises:
        StudyError: the class cannot be imported.
    """
    name = str(class_path)
    module, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "torch.optim"), attr)
    except (ImportError, AttributeError, ValueError):
        raise StudyError(f"--population: the base config's optimizer {name} cannot be imported") from None
    return isinstance(cls, type) and issubclass(cls, torch.optim.SGD)


def population_config(study: Study, cells: list[Cell]) -> dict[str, Any]:
    """The ``fit`` config of one population of ``cells`` × the study's seeds, built from the study's base config.

    Raises:
        StudyError: the base is not a ``DropoutMLP`` config, a cell varies something other than
            ``model.init_args.dropouts`` and ``model.init_args.optimizer.init_args.weight_decay``, or it varies the
            weight decay of an optimizer other than SGD.
    """
    config = _base_config(study)
    model = config["model"]
    if model.get("class_path") != MLP:
        raise StudyError(f"--population: base config {study.base} trains {model.get('class_path')}; only {MLP} "
                         "studies can be trained as one population")  # fmt: skip
    init = dict(model.get("init_args") or {})
    for key, allowed in _FIXED.items():
        if init.get(key, allowed) != allowed:
            raise StudyError(f"--population: {study.base}: model.init_args.{key} is {init[key]!r}; a population "
                             f"supports only {allowed!r}")  # fmt: skip
    optimizer = init.get("optimizer") or {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}
    if isinstance(optimizer, str):  # `optimizer: torch.optim.Adam`, which fit accepts: its defaults
        optimizer = {"class_path": optimizer}
    if not isinstance(optimizer, dict) or "class_path" not in optimizer:
        raise StudyError(f"--population: {study.base}: model.init_args.optimizer must be a class name or a mapping "
                         f"with class_path, got {optimizer!r}")  # fmt: skip
    optimizer = dict(optimizer)
    opt_args = dict(optimizer.get("init_args") or {})
    sgd = _is_sgd(optimizer.get("class_path"))
    # SGD's decay becomes the members' own (weight_decays); another optimizer keeps its weight_decay as given
    # (Adam's L2 term, AdamW's decoupled decay: elementwise, so the same for every member as in a separate run)
    base_wd = float(opt_args.pop("weight_decay", 0.0)) if sgd else 0.0
    optimizer["init_args"] = opt_args
    dropouts, wds = [], []
    for cell in cells:
        other = set(cell.overrides) - {DROPOUTS, WEIGHT_DECAY} - ({"config"} if cell.overrides.get("config") ==
                                                                   study.base else set())  # fmt: skip
        if other:
            raise StudyError(f"--population: cell {cell.name} sets {', '.join(sorted(other))}; a population varies "
                             f"only {DROPOUTS} and {WEIGHT_DECAY}")  # fmt: skip
        dropouts.append([float(p) for p in cell.overrides.get(DROPOUTS, init.get("dropouts", [0.5, 0.5]))])
        wds.append(float(cell.overrides.get(WEIGHT_DECAY, base_wd)))
    if not sgd and any(WEIGHT_DECAY in cell.overrides for cell in cells):
        raise StudyError(f"--population: the members' own weight decay is added to the gradients as SGD does; the "
                         f"base optimizer is {optimizer.get('class_path')}, so {WEIGHT_DECAY} cannot vary")  # fmt: skip
    pop_args: dict[str, Any] = {
        "hidden_sizes": list(init.get("hidden_sizes", [256, 256])), "dropouts": dropouts, "weight_decays": wds,
        "members_per_cell": len(study.seeds), "init_seeds": list(study.seeds), "test_weights": "best",
        "optimizer": optimizer,
    }  # fmt: skip
    if init.get("micro_batch_size") is not None:
        pop_args["micro_batch_size"] = init["micro_batch_size"]
    config["model"] = {"class_path": "dropout_lab.population.PopulationMLP", "init_args": pop_args}
    trainer = config.setdefault("trainer", {})
    callbacks = trainer.get("callbacks") or []
    trainer["callbacks"] = [c for c in callbacks if not str(c.get("class_path", "")).endswith(_CALLBACKS_DROPPED)]
    # each member keeps its own best-validation weights (and is tested with them); no "best by the mean" file
    config["checkpoint"] = {"monitor": None, "filename": "epoch{epoch:02d}", "save_last": True}
    config["seed_everything"] = study.seeds[0]
    data_args = _data_args(config)
    if data_args.get("loader", "tensor") == "tensor" and data_args.get("shuffle_seed") is None:
        data_args["shuffle_seeds"] = list(study.seeds)  # member c<cell>s<j>: the data order of a run of seed j
    return config


def _run_dir(study: Study, logdir: Path) -> Path:
    """The population run's TensorBoard folder: ``<logdir>/<study>/population/seeds<s0>_<s1>_…``."""
    return logdir / study.name / "population" / ("seeds" + "_".join(map(str, study.seeds)))


def _fit_args(study: Study, config_path: Path, logdir: Path, extra: list[str]) -> list[str]:
    """The population's ``fit`` arguments: :func:`run_args` of one pseudo-cell ``population``, progress bar on."""
    args = run_args(study, Cell("population", {"config": str(config_path)}), study.seeds[0], logdir, extra)
    args.remove("--trainer.enable_progress_bar=false")  # one long run: show its progress
    version = "--trainer.logger.init_args.version="
    return [f"{version}{_run_dir(study, logdir).name}" if a.startswith(version) else a for a in args]


def run_population(
    study: Study, todo: list[tuple[Cell, int]], logdir: Path, extra: list[str], keep: bool, dry_run: bool = False
) -> None:
    """Train ``todo``'s cells × seeds as one population; append one results row (and curves) per member."""
    cells = population_cells(study, todo)
    if not cells:
        return
    if study.test_every_epoch or study.figure == "variance":
        raise StudyError("--population: test_every_epoch and the variance figure need separate runs")
    config = population_config(study, cells)
    path = study.out / "population.yaml"
    header = (
        f"# study {study.name}: {len(cells)} cells × seeds {study.seeds} as one PopulationMLP (study --population)\n"
    )
    args = _fit_args(study, path, logdir, extra)
    if dry_run:
        print(f"population of {len(cells)} cells × {len(study.seeds)} seeds: python -m dropout_lab " + " ".join(args))
        print(header + yaml.safe_dump(config, sort_keys=False))
        return
    text, run_dir = header + yaml.safe_dump(config, sort_keys=False), _run_dir(study, logdir)
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = last.is_file() and path.is_file() and path.read_text() == text  # an interrupted attempt of this run
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)  # what an attempt with another config left
        path.write_text(text)
    print(f"population: {len(cells)} cells × {len(study.seeds)} seeds = {len(cells) * len(study.seeds)} members "
          f"in one run ({path})" + (f"; resuming from {last}" if resume else ""), flush=True)  # fmt: skip
    rows, curves, seconds = _fit(study, cells, [*args, f"--ckpt_path={last}"] if resume else args, run_dir)
    options = run_options(study, extra)  # the options of each member's run, as a separate run records them
    rows = [row | {"options": options} for row in rows]
    report.append_rows(study.out / "curves.csv", report.CURVE_FIELDS, curves)
    report.append_rows(study.out / "results.csv", report.RESULT_FIELDS, rows)
    note = {"cells": [c.name for c in cells], "seeds": study.seeds, "seconds": round(seconds, 1),
            "members": len(rows), "config": str(path), "resumed": resume,
            "data_orders": _data_orders(config, extra), "init": "as separate runs"}  # fmt: skip
    notes = study.out / report.POPULATION_NOTES
    previous = json.loads(notes.read_text()) if notes.exists() else []
    notes.write_text(json.dumps([*previous, note], indent=1) + "\n")
    print(f"population: {len(rows)} runs in {seconds:.1f} s", flush=True)
    if not keep:
        shutil.rmtree(_run_dir(study, logdir) / "checkpoints", ignore_errors=True)


def _fit(study: Study, cells: list[Cell], args: list[str], run_dir: Path) -> tuple[list[dict], list[dict], float]:
    """Run the population's ``fit`` + test; its per-member results rows and curve rows, and its wall time.

    The rows are read from the run's TensorBoard folder ``run_dir`` (all its event files: a resumed run's too).
    """
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from dropout_lab.cli import ConfigError, DropoutLabCLI
    from dropout_lab.cli_text import condense_error
    from dropout_lab.idx import DataError
    from dropout_lab.reliability import DivergenceError

    start = time.perf_counter()
    try:
        with warnings.catch_warnings():  # `study`'s own sys.argv is not meant for this fit: no need to say so
            warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended")
            cli = DropoutLabCLI(args=args)
    except (DataError, ConfigError, MisconfigurationException, ArgumentError) as err:
        raise StudyError(f"--population: {condense_error(str(err))}") from None
    except DivergenceError as err:  # name the members as the study does: cell and seed
        named = re.sub(
            r"\bc(\d+)s(\d+)\b", lambda m: f"{cells[int(m[1])].name} seed {study.seeds[int(m[2])]}", str(err)
        )
        raise DivergenceError(f"--population: {named}") from None
    if cli.trainer.interrupted:
        raise KeyboardInterrupt
    seconds = time.perf_counter() - start
    final = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    scalars = report.read_scalars(run_dir)
    nan = [(0, float("nan"))]
    rows, curves = [], []
    for c, cell in enumerate(cells):
        for j, seed in enumerate(study.seeds):
            member = f"c{c}s{j}"
            train, val = scalars.get(f"train/acc/{member}", nan), scalars.get(f"val/acc/{member}", nan)
            rows.append({
                "cell": cell.name, "seed": seed, "max_epochs": cli.trainer.max_epochs,
                "test_acc": final.get(f"test/acc/{member}", float("nan")),
                "test_loss": final.get(f"test/loss/{member}", float("nan")),
                "val_acc": val[-1][1], "best_val_acc": max(v for _, v in val), "train_acc": train[-1][1],
                "gap": train[-1][1] - val[-1][1], "steps": cli.trainer.global_step,
                "seconds": round(seconds / (len(cells) * len(study.seeds)), 1),
                "overrides": json.dumps(cell.overrides), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            })  # fmt: skip
            for tag in ("train/acc", "val/acc", "val/loss"):
                curves += [
                    {"cell": cell.name, "seed": seed, "tag": tag, "step": step, "value": f"{value:.6g}"}
                    for step, value in scalars.get(f"{tag}/{member}", [])
                ]
    cli.trainer.logger.finalize("success")
    return rows, curves, seconds
