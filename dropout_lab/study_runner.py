"""Running a study's (cell, seed) pairs: each a ``fit`` + test through :class:`DropoutLabCLI`, one or several at once.

With ``jobs`` > 1 the runs go to that many worker processes (each with ``torch threads / jobs`` CPU threads, or
sharing the GPU); only this process appends to ``results.csv`` and ``curves.csv``, as each run finishes.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import multiprocessing
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from dropout_lab import study_report as report
from dropout_lab.studies import MIN_SEEDS, Cell, Study, StudyError, run_args
from dropout_lab.study_resume import pending, run_options

__all__ = ["run_one", "run_study"]


def _quiet_lightning() -> None:
    import lightning.pytorch  # noqa: F401  (importing it sets its loggers to INFO: quiet them after that)

    for name in ("lightning.pytorch", "lightning.fabric"):  # their INFO lines would drown the progress lines
        logging.getLogger(name).setLevel(logging.WARNING)


def run_study(
    study: Study,
    logdir: Path,
    extra: list[str],
    dry_run: bool = False,
    keep: bool = False,
    jobs: int = 1,
    population: bool = False,
) -> None:
    """Run the study's unfinished (cell, seed) pairs, ``jobs`` at a time or as one population, then report."""
    from dropout_lab.study_population import run_population

    results = study.out / "results.csv"
    if dry_run:
        todo = _todo(study, extra)
        if population:
            return run_population(study, todo, logdir, extra, keep, dry_run=True)
        for cell, seed in todo:
            print(f"{cell.name} seed {seed}: " + " ".join(run_args(study, cell, seed, logdir, extra)))
        return
    study.out.mkdir(parents=True, exist_ok=True)
    # its results and its TensorBoard runs (removed and rewritten by each run) are this process's alone
    logs = logdir / study.name  # locked once where --out is that folder (two flocks of one file would clash)
    same = logs.resolve() == study.out.resolve()
    with _exclusive(study.out, "--out"), contextlib.nullcontext() if same else _exclusive(logs, "--logdir"):
        todo = _todo(study, extra)  # read under the lock: rows a study that held it just wrote count as done
        _quiet_lightning()
        if population:
            run_population(study, todo, logdir, extra, keep)
        else:
            _run_todo(study, todo, logdir, extra, keep, jobs)
    for path in report.write_report(study, report.read_rows(results), report.read_rows(study.out / "curves.csv")):
        print(f"wrote {path}")


def _todo(study: Study, extra: list[str]) -> list[tuple[Cell, int]]:
    """The study's unfinished (cell, seed) pairs (:func:`pending`), announced with the count of finished ones."""
    results = study.out / "results.csv"
    rows = report.read_rows(results)
    todo = pending(study, rows, extra)
    unrecorded = sum(1 for row in rows if not row.get("options"))
    if unrecorded:
        print(f"note: {unrecorded} finished row(s) in {results} predate the record of the runs' options; "
              "their options are not checked against this run's", flush=True)  # fmt: skip
    total = len(study.cells) * len(study.seeds)
    print(f"study {study.name}: {len(study.cells)} cells × {len(study.seeds)} seeds = {total} runs; "
          f"{total - len(todo)} done, {len(todo)} to run; results in {results}", flush=True)  # fmt: skip
    if len(study.seeds) < MIN_SEEDS:
        print(f"warning: {len(study.seeds)} seed(s); {MIN_SEEDS} is the floor for the t-tests to mean much", flush=True)
    return todo


@contextlib.contextmanager
def _exclusive(folder: Path, option: str) -> Iterator[None]:
    """Hold ``<folder>/.study.lock``, so that two processes never run (and overwrite) the same runs.

    ``option`` names the argument that picks another folder, for the message when another study holds it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".study.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(
                f"{folder} is in use by another running study; wait for it, or pass another {option}"
            ) from None
        yield


def _run_todo(
    study: Study, todo: list[tuple[Cell, int]], logdir: Path, extra: list[str], keep: bool, jobs: int
) -> None:
    """Run ``todo``, appending each finished run's rows and printing a progress line with an ETA."""
    results = study.out / "results.csv"
    start = time.perf_counter()
    for k, (cell, seed, row, curves) in enumerate(_runs(study, todo, logdir, extra, keep, jobs), 1):
        report.append_rows(study.out / "curves.csv", report.CURVE_FIELDS, curves)
        report.append_rows(results, report.RESULT_FIELDS, [row])  # the row marks the run as finished
        eta = f"ETA {(time.perf_counter() - start) / k * (len(todo) - k) / 60:.1f} min"
        print(f"[{k}/{len(todo)}] {cell.name} seed {seed}: test acc {float(row['test_acc']):.4f}, "
              f"gap {float(row['gap']):+.4f}, {row['seconds']} s; {eta}", flush=True)  # fmt: skip


def _runs(study: Study, todo: list[tuple[Cell, int]], logdir: Path, extra: list[str], keep: bool, jobs: int) -> Any:
    """Yield ``(cell, seed, row, curves)`` as runs finish: in this process, or in ``jobs`` worker processes."""
    if jobs <= 1 or len(todo) <= 1:
        for cell, seed in todo:
            yield (cell, seed, *run_one(study, cell, seed, logdir, extra, keep))
        return
    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")  # no forked copy of this process's torch/CUDA state
    workers = min(jobs, len(todo))
    queue = iter(todo)  # submitted one per free worker: nothing waits in the pool's queue when a run fails
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        running: dict[Future, tuple[Cell, int]] = {}

        def submit() -> None:
            for cell, seed in itertools.islice(queue, workers - len(running)):
                running[pool.submit(_run_in_worker, threads, study, cell, seed, logdir, extra, keep)] = (cell, seed)

        try:
            submit()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: f.exception() is not None):  # results before errors
                    cell, seed = running.pop(future)
                    yield (cell, seed, *future.result())
                submit()
        except Exception as err:  # a run failed (e.g. diverged): start no other, but keep the runs in flight
            yield from _in_flight(running, err)
            raise
        except BaseException:  # Ctrl-C, or the caller stopped: the finished rows are on disk; the rest rerun
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _in_flight(running: dict[Future, tuple[Cell, int]], first: BaseException) -> Iterator[tuple[Any, ...]]:
    """Yield the results of the runs that were already running when another failed (``first``), as they finish.

    A second failure among them becomes a note on ``first`` (``also failed: cell … seed …: …``), the error that
    ends the study.
    """
    for future in running:
        cell, seed = running[future]
        try:
            result = future.result()
        except Exception as err:  # noted on the first failure, which is the one raised
            where = f"cell {cell.name} seed {seed}"
            message = (str(err).splitlines() or [type(err).__name__])[0]
            message = message.removeprefix(f"{where}: ").removeprefix(f"cell {cell.name}: ")  # run_one's prefixes
            first.add_note(f"also failed: {where}: {message}")
            continue
        yield (cell, seed, *result)


def _run_in_worker(
    threads: int, study: Study, cell: Cell, seed: int, logdir: Path, extra: list[str], keep: bool
) -> tuple[dict, list]:
    """:func:`run_one` in a worker process with ``threads`` intra-op CPU threads."""
    import torch

    torch.set_num_threads(threads)
    _quiet_lightning()
    return run_one(study, cell, seed, logdir, extra, keep)


def _epoch_tests(cli: Any) -> list[tuple[int, float]]:
    """Test accuracy of every epoch's checkpoint, through the run's own Trainer (its loggers detached)."""
    cli.trainer.loggers = []
    out = []
    for path in sorted(Path(cli.trainer.checkpoint_callback.dirpath).glob("*epoch*.ckpt")):
        result = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(path), verbose=False)
        out.append((int(re.findall(r"epoch(\d+)", path.name)[-1]), float(result[0]["test/acc"])))
    return out


def run_one(study: Study, cell: Cell, seed: int, logdir: Path, extra: list[str], keep: bool) -> tuple[dict, list]:
    """One ``fit`` + test through :class:`DropoutLabCLI` (see :func:`run_args`); returns its results and curve rows.

    The run's console output goes to ``run.log`` in its TensorBoard folder (removed first if an unfinished
    attempt left one). Its hyperparameters and final metrics go to TensorBoard's HPARAMS tab.
    """
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from dropout_lab.cli import ConfigError, DropoutLabCLI
    from dropout_lab.cli_text import condense_error
    from dropout_lab.idx import DataError
    from dropout_lab.reliability import DivergenceError

    run_dir = logdir / study.name / cell.name / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    start = time.perf_counter()
    try:
        with (run_dir / "run.log").open("w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            cli = DropoutLabCLI(args=run_args(study, cell, seed, logdir, extra))
            if cli.trainer.interrupted:  # Ctrl-C: Lightning stopped the fit; stop the study without a row
                raise KeyboardInterrupt
            final = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
            logger = cli.trainer.logger
            epoch_tests = _epoch_tests(cli) if study.test_every_epoch else []
    except (DataError, ConfigError, MisconfigurationException, ArgumentError) as err:
        raise StudyError(f"cell {cell.name}: {condense_error(str(err))}") from None
    except DivergenceError as err:
        raise DivergenceError(f"cell {cell.name} seed {seed}: {err} (its log: {run_dir / 'run.log'})") from None
    seconds = time.perf_counter() - start
    scalars = report.read_scalars(run_dir)
    train, val = scalars.get("train/acc", [(0, float("nan"))]), scalars.get("val/acc", [(0, float("nan"))])
    row = {
        "cell": cell.name, "seed": seed, "max_epochs": cli.trainer.max_epochs,
        "test_acc": final.get("test/acc", float("nan")), "test_loss": final.get("test/loss", float("nan")),
        "val_acc": val[-1][1], "best_val_acc": max(v for _, v in val), "train_acc": train[-1][1],
        "gap": train[-1][1] - val[-1][1], "steps": cli.trainer.global_step, "seconds": round(seconds, 1),
        "overrides": json.dumps(cell.overrides), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "options": run_options(study, extra),
    }  # fmt: skip
    scalars["test_epoch/acc"] = epoch_tests
    curves = [
        {"cell": cell.name, "seed": seed, "tag": tag, "step": step, "value": f"{value:.6g}"}
        for tag, series in scalars.items()
        if not tag.startswith(("epoch", "hparams/"))
        for step, value in series
    ]
    model = cli.config.fit.model.as_dict()
    metrics = {f"hparams/{k}": float(row[k]) for k in report.RESULT_FIELDS[3:9]}  # TensorBoard's HPARAMS tab
    logger.log_hyperparams({"cell": cell.name, "seed": seed, "max_epochs": row["max_epochs"], "model": model}, metrics)
    logger.finalize("success")
    if not keep:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return row, curves
