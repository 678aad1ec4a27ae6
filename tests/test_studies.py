"""The study runner: grid expansion, study files, resume-by-skipping, statistics, and one tiny study end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from dropout_lab.cli import main as cli_main
from dropout_lab.studies import Cell, StudyError, expand_grid, load_study
from dropout_lab.study_report import (
    RESULT_FIELDS,
    append_rows,
    betainc,
    format_value,
    holm,
    mean_std,
    read_rows,
    short_keys,
    summarize,
    tables,
    welch_t,
)
from dropout_lab.study_resume import pending

ROOT = Path(__file__).resolve().parents[1]


def write_study(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_expand_grid_is_the_product_with_names_from_the_overrides() -> None:
    cells = expand_grid({"model.init_args.dropouts": [[0.1, 0.5], [0.0, 0.0]], "trainer.max_epochs": [1, 2]})
    assert [c.name for c in cells] == [
        "dropouts=0.1,0.5+max_epochs=1",
        "dropouts=0.1,0.5+max_epochs=2",
        "dropouts=0,0+max_epochs=1",
        "dropouts=0,0+max_epochs=2",
    ]
    assert cells[1].overrides == {"model.init_args.dropouts": [0.1, 0.5], "trainer.max_epochs": 2}
    with pytest.raises(StudyError, match=r"grid\.a: expected a non-empty list"):
        expand_grid({"a": []})


def test_short_keys_and_values() -> None:
    assert short_keys(["model.init_args.p", "data.p", "trainer.max_epochs"]) == {
        "model.init_args.p": "init_args.p",
        "data.p": "data.p",
        "trainer.max_epochs": "max_epochs",
    }
    assert format_value(0.0001) == "0.0001"
    assert format_value("torch.optim.Adam") == "Adam"
    assert format_value("configs/mlp_scratch.yaml", key="config") == "mlp_scratch"


def test_every_study_file_loads() -> None:
    files = sorted((ROOT / "configs" / "studies").glob("*.yaml"))
    assert {f.stem for f in files} >= {"swap", "epochs", "variance", "weight_decay", "variants", "hinton"}
    for path in files:
        study = load_study(path)
        assert study.baseline in [c.name for c in study.cells]
        assert len(study.seeds) >= 3 or "tuning" in path.stem  # the floor, except for one-seed tuning on val
        for cell in study.cells:
            assert (ROOT / cell.overrides.get("config", study.base)).exists()
    assert len(load_study(ROOT / "configs/studies/weight_decay.yaml").cells) == 12


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("base: x.yaml\ngrid: {a: [1]}\nsurprise: 1\n", "unknown key"),
        ("base: x.yaml\n", "exactly one of `grid` or `cells`"),
        ("base: x.yaml\ngrid: {a: [1]}\nbaseline: nope\n", "no cell named 'nope'"),
        ("base: x.yaml\ngrid: {a: [1]}\nseeds: [1, 1]\n", "seeds repeat"),
        ("base: x.yaml\ngrid: {a: [1]}\nfigure: pie\n", "figure: 'pie' is not one of"),
    ],
)
def test_bad_study_files_are_one_line_errors(tmp_path: Path, body: str, message: str, capsys) -> None:
    path = write_study(tmp_path / "s.yaml", body)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["study", "--config", str(path), "--dry_run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_pending_skips_finished_pairs(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path / "s.yaml", "base: b.yaml\ngrid: {x: [1, 2]}\nseeds: 3\nepochs: 2\n"))
    done = [{"cell": "x=1", "seed": "0", "max_epochs": "2"}, {"cell": "x=2", "seed": "2", "max_epochs": "2"}]
    left = [(c.name, s) for c, s in pending(study, done)]
    assert left == [("x=2", 0), ("x=1", 1), ("x=2", 1), ("x=1", 2)]  # seeds outermost
    with pytest.raises(StudyError, match="holds runs of max_epochs 5"):
        pending(study, [{"cell": "x=1", "seed": "0", "max_epochs": "5"}])


def test_pending_checks_max_epochs_from_the_config_when_the_study_sets_none(tmp_path: Path) -> None:
    """Without ``epochs``, a finished row must match what the cell's arguments or its config file give."""
    (tmp_path / "b.yaml").write_text("trainer:\n  max_epochs: 3\n")
    body = f"base: {tmp_path / 'b.yaml'}\ncells:\n  a: {{}}\n  long: {{trainer.max_epochs: 7}}\nseeds: 2\n"
    study = load_study(write_study(tmp_path / "s.yaml", body))
    ok = [{"cell": "a", "seed": "0", "max_epochs": "3"}, {"cell": "long", "seed": "0", "max_epochs": "7"}]
    assert [(c.name, s) for c, s in pending(study, ok)] == [("a", 1), ("long", 1)]
    with pytest.raises(StudyError, match=r"holds runs of max_epochs 5, not 3 \(cell a\)"):
        pending(study, [{"cell": "a", "seed": "0", "max_epochs": "5"}])
    with pytest.raises(StudyError, match=r"max_epochs 3, not 7 \(cell long\)"):
        pending(study, [{"cell": "long", "seed": "0", "max_epochs": "3"}])
    # options after `--` count too, in either spelling
    assert len(pending(study, [{"cell": "a", "seed": "0", "max_epochs": "5"}], ["--trainer.max_epochs", "5"])) == 3
    with pytest.raises(StudyError, match="not 4"):
        pending(study, [{"cell": "a", "seed": "0", "max_epochs": "5"}], ["--trainer.max_epochs=4"])
    # another config file merged by the runs' options may set it: then the rows are not checked
    for merged in (["--config", "short.yaml"], ["--trainer=tr.yaml"], ["--trainer", "tr.yaml"]):
        assert len(pending(study, [{"cell": "a", "seed": "0", "max_epochs": "5"}], merged)) == 3
    # ... also after a --trainer.max_epochs option (the file's value wins); an option after the file is checked
    eight = [{"cell": "a", "seed": "0", "max_epochs": "8"}]
    assert len(pending(study, eight, ["--trainer.max_epochs=5", "--config", "long.yaml"])) == 3
    with pytest.raises(StudyError, match=r"max_epochs 8, not 4 \(cell a\)"):
        pending(study, eight, ["--config=x.yaml", "--trainer.max_epochs", "4"])
    with pytest.raises(StudyError, match=r"max_epochs 8, not 7 \(cell long\)"):  # its override comes after the file
        pending(study, [{"cell": "long", "seed": "0", "max_epochs": "8"}], ["--config", "short.yaml"])


@pytest.mark.parametrize(
    "grid", ["{a: [1, 2]}", "{a: [1, 2], b: [1], c: [3]}", None], ids=["one key", "three keys", "cells"]
)
def test_a_heatmap_needs_a_grid_of_two_keys(tmp_path: Path, grid: str | None) -> None:
    cells = f"grid: {grid}" if grid else "cells: {x: {a: 1}, y: {a: 2}}"
    with pytest.raises(StudyError, match="heatmap needs a `grid` of exactly two keys"):
        load_study(write_study(tmp_path / "s.yaml", f"base: b.yaml\n{cells}\nfigure: heatmap\n"))
    assert load_study(write_study(tmp_path / "t.yaml", "base: b.yaml\ngrid: {a: [1], b: [2]}\nfigure: heatmap\n"))


def test_results_rows_are_appended_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    append_rows(path, ["cell", "seed"], [{"cell": "a,b", "seed": 0}])
    append_rows(path, ["cell", "seed"], [{"cell": "c", "seed": 1}])
    assert read_rows(path) == [{"cell": "a,b", "seed": "0"}, {"cell": "c", "seed": "1"}]
    assert read_rows(tmp_path / "missing.csv") == []


def test_statistics_on_known_numbers() -> None:
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5 / 3)))
    assert betainc(2, 3, 0.5) == pytest.approx(0.6875, abs=1e-12)
    # reference values from scipy.stats.ttest_ind(a, b, equal_var=False)
    t, df, p = welch_t([1, 2, 3, 4], [2, 4, 6, 8, 10])
    assert (t, df, p) == pytest.approx((-2.2514363231593695, 5.520787746170677, 0.06913359319239237), rel=1e-9)
    t, df, p = welch_t([0.861, 0.858, 0.864], [0.850, 0.853, 0.849])
    assert (t, p) == pytest.approx((4.901530373260971, 0.010743485935043389), rel=1e-9)
    assert welch_t([1.0, 1.0], [1.0, 1.0])[2] == 1.0
    assert math.isnan(welch_t([1.0], [1.0, 2.0])[2])
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_holm_leaves_undefined_p_values_out_of_the_family() -> None:
    # a NaN p (a cell with one seed) is no test: it stays NaN and the others are corrected as a family of two
    adjusted = holm([0.001, math.nan, 0.002])
    assert adjusted[0] == pytest.approx(0.002) and adjusted[2] == pytest.approx(0.002)
    assert math.isnan(adjusted[1])
    assert holm([math.nan, 0.001, 0.002])[1:] == pytest.approx([0.002, 0.002])
    assert all(math.isnan(p) for p in holm([math.nan, math.nan]))


def test_welch_matches_scipy_when_installed() -> None:
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.8812, 0.8790, 0.8851, 0.8833, 0.8802], [0.8768, 0.8801, 0.8749]
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert welch_t(a, b)[0] == pytest.approx(ref.statistic, rel=1e-9)
    assert welch_t(a, b)[2] == pytest.approx(ref.pvalue, rel=1e-9)


def test_table_marks_significant_cells(tmp_path: Path) -> None:
    body = "base: b.yaml\ngrid: {x: [1, 2, 3]}\nseeds: 3\ncompare: [['x=2', 'x=3']]\n"
    study = load_study(write_study(tmp_path / "s.yaml", body))
    accs = {"x=1": [0.850, 0.853, 0.849], "x=2": [0.861, 0.858, 0.864], "x=3": [0.851, 0.852, 0.850]}
    rows = [
        {"cell": c, "seed": str(s), "test_acc": str(a), "best_val_acc": "0.9", "gap": "0.01", "seconds": "1"}
        for c, values in accs.items()
        for s, a in enumerate(values)
    ]
    stats = summarize(study, [*rows, {**rows[0], "cell": "gone"}])
    assert list(stats) == ["x=1", "x=2", "x=3"] and stats["x=2"].seeds == [0, 1, 2]
    text = tables(study, stats)
    assert "| **x=1** (baseline) | 85.07 ± 0.21 | 90.00 ± 0.00 | 1.00 ± 0.00 | 3 |" in text
    assert "| x=2 | 86.10 ± 0.30 | 90.00 ± 0.00 | 1.00 ± 0.00 | 3 | +1.03 | 0.011 | 0.021 | **yes** |" in text
    assert "| x=3 |" in text and "| no |" in text
    assert "| x=2 | x=3 | 86.10 ± 0.30 | 85.10 ± 0.10 | +1.00 |" in text


def test_a_cell_with_one_seed_has_no_spread_and_no_test(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path / "s.yaml", "base: b.yaml\ngrid: {x: [1, 2, 3]}\nseeds: 3\n"))
    accs = {"x=1": [0.850, 0.853, 0.849], "x=2": [0.861, 0.858, 0.864], "x=3": [0.80]}
    rows = [
        {"cell": c, "seed": str(s), "test_acc": str(a), "best_val_acc": "0.9", "gap": "0.01", "seconds": "1"}
        for c, values in accs.items()
        for s, a in enumerate(values)
    ]
    text = tables(study, summarize(study, rows))
    # x=3's undefined p is left out of Holm's family: x=2 is corrected as one comparison, not two
    assert "| x=2 | 86.10 ± 0.30 | 90.00 ± 0.00 | 1.00 ± 0.00 | 3 | +1.03 | 0.011 | 0.011 | **yes** |" in text
    assert "| x=3 | 80.00 ± — | 90.00 ± — | 1.00 ± — | 1 | -5.07 | – | – | – |" in text


TINY = (
    f"base: {ROOT / 'configs/mlp.yaml'}\n"
    "grid:\n  model.init_args.dropouts: [[0.5, 0.5], [0.0, 0.0]]\n"
    "seeds: 2\nepochs: 2\nfigure: curves\n"
    "args: ['--trainer.accelerator=cpu', '--trainer.limit_train_batches=2', '--trainer.limit_val_batches=1',\n"
    "       '--trainer.limit_test_batches=1', '--data.val_size=100', '--data.batch_size=32']\n"
)


def tiny_study(tmp_path: Path, tv_data_dir: Path, out: str = "out") -> tuple[list[str], Path, Path]:
    """argv of the tiny 2 cells × 2 seeds study on the synthetic set, its out folder and its log root."""
    path = write_study(tmp_path / "tiny.yaml", TINY)
    out_dir, logs = tmp_path / out, tmp_path / f"logs_{out}"
    argv = ["study", "--config", str(path), "--out", str(out_dir), "--logdir", str(logs), "--", "--data.data_dir"]
    return [*argv, str(tv_data_dir)], out_dir, logs


def test_tiny_study_end_to_end_and_resume(tmp_path: Path, tv_data_dir: Path, capsys) -> None:
    argv, out, logs = tiny_study(tmp_path, tv_data_dir)
    cli_main(argv)
    printed = capsys.readouterr().out
    assert "[4/4] dropouts=0,0 seed 1: test acc" in printed and "ETA" in printed
    rows = read_rows(out / "results.csv")
    assert [(r["cell"], r["seed"]) for r in rows] == [
        ("dropouts=0.5,0.5", "0"), ("dropouts=0,0", "0"), ("dropouts=0.5,0.5", "1"), ("dropouts=0,0", "1"),
    ]  # fmt: skip
    assert set(rows[0]) == set(RESULT_FIELDS) and all(r["max_epochs"] == "2" for r in rows)
    assert (out / "tiny.md").read_text().count("± ") >= 4 and (out / "tiny.png").stat().st_size > 1000
    run_dir = logs / "tiny" / "dropouts=0,0" / "seed1"
    assert (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()
    from dropout_lab.study_report import read_scalars

    assert {"hparams/test_acc", "val/acc", "train/acc"} <= set(read_scalars(run_dir))
    # a study killed after 3 runs: only the missing (cell, seed) pair runs again
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows(rows[:3])
    cli_main(argv)
    printed = capsys.readouterr().out
    assert "3 done, 1 to run" in printed and "[1/1] dropouts=0,0 seed 1" in printed
    cli_main(argv)
    assert "4 done, 0 to run" in capsys.readouterr().out
    assert len(read_rows(out / "results.csv")) == 4
    assert Cell("x", {}).name == "x"


def test_jobs_run_the_same_runs_in_worker_processes(
    tmp_path: Path, tv_data_dir: Path, capsys, monkeypatch, request
) -> None:
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # --jobs 2 → one thread per worker
    torch.set_num_threads(1)  # the sequential reference: one thread too, so the runs are bit-identical
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    seq_argv, seq_out, _ = tiny_study(tmp_path, tv_data_dir, "seq")
    cli_main(seq_argv)
    par_argv, par_out, par_logs = tiny_study(tmp_path, tv_data_dir, "par")
    cli_main([*par_argv[:1], "--jobs", "2", *par_argv[1:]])
    printed = capsys.readouterr().out
    assert "[4/4]" in printed and (par_out / "tiny.md").exists()
    keys = ("test_acc", "test_loss", "val_acc", "train_acc", "steps")

    def by_pair(out: Path) -> dict:
        return {(r["cell"], r["seed"]): tuple(r[k] for k in keys) for r in read_rows(out / "results.csv")}

    assert by_pair(par_out) == by_pair(seq_out) and len(by_pair(par_out)) == 4
    assert (par_logs / "tiny" / "dropouts=0,0" / "seed1" / "run.log").exists()


def test_a_study_whose_out_is_its_log_folder_runs(tmp_path: Path, tv_data_dir: Path, capsys) -> None:
    """--out <logdir>/<name>: one folder, locked once (a second flock of the same file would refuse the study)."""
    argv, _, logs = tiny_study(tmp_path, tv_data_dir)
    argv[argv.index("--out") + 1] = str(logs / "tiny")
    cli_main([*argv[:3], "--seeds", "0", *argv[3:]])
    assert len(read_rows(logs / "tiny" / "results.csv")) == 2 and "[2/2]" in capsys.readouterr().out


def test_a_rerun_with_other_options_is_refused(tmp_path: Path, tv_data_dir: Path, capsys) -> None:
    """The rows record the runs' options; a rerun whose options differ would mix two experiments in one table."""
    argv, out, _ = tiny_study(tmp_path, tv_data_dir)
    argv = [*argv[:3], "--seeds", "0", *argv[3:]]
    cli_main(argv)
    rows = read_rows(out / "results.csv")
    assert {r["options"] for r in rows} == {json.dumps({  # the study's args; data folder and device left out
        "--trainer.limit_train_batches": "2", "--trainer.limit_val_batches": "1",
        "--trainer.limit_test_batches": "1", "--data.val_size": "100", "--data.batch_size": "32",
    }, sort_keys=True)}  # fmt: skip
    seeds = [*argv[:4], "0", "1", *argv[5:]]  # one more seed, so a run is left to do
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*seeds, "--model.init_args.hidden_sizes", "[16, 16]"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "holds runs made with other options" in err and "Traceback" not in err, err
    assert "--model.init_args.hidden_sizes: (not given) → [16, 16]" in err, err  # the key that differs is named
    assert len(read_rows(out / "results.csv")) == 2  # nothing ran
    # the same options, another spelling (`--k v`) and another data folder: the same runs
    spelled = [a for a in seeds if a != "--data.data_dir"]
    spelled[spelled.index(str(tv_data_dir))] = f"--data.data_dir={tv_data_dir}"
    cli_main([*spelled, "--trainer.limit_train_batches", "2", "--trainer.accelerator", "cpu"])  # a key given again
    assert "2 done, 2 to run" in capsys.readouterr().out and len(read_rows(out / "results.csv")) == 4


def test_run_options_keep_what_wins(tmp_path: Path) -> None:
    from dropout_lab.study_resume import run_options

    study = load_study(write_study(tmp_path / "s.yaml", "base: b.yaml\ngrid: {x: [1]}\nseeds: 1\n"
                                   "args: ['--trainer.callbacks+=A', '--data.batch_size=64']\n"))  # fmt: skip
    extra = ["--trainer.callbacks+=B", "--config", "x.yaml", "--data.batch_size", "32", "--trainer.accelerator=gpu"]
    assert json.loads(run_options(study, extra)) == {
        "--trainer.callbacks+": ["A", "B"], "--config": ["x.yaml"], "--data.batch_size": "32",
    }  # fmt: skip


def test_rows_append_to_a_file_with_an_older_header(tmp_path: Path) -> None:
    """A results.csv of a version without the `options` column gets it (empty for its rows); nothing shifts."""
    path = tmp_path / "results.csv"
    old = [f for f in RESULT_FIELDS if f != "options"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old)
        writer.writeheader()
        writer.writerow({k: "1" for k in old})
    append_rows(path, RESULT_FIELDS, [{k: "2" for k in RESULT_FIELDS}])
    rows = read_rows(path)
    assert [list(r) for r in rows] == [RESULT_FIELDS] * 2
    assert [(r["seed"], r["options"]) for r in rows] == [("1", ""), ("2", "2")]
    assert not list(tmp_path.glob("*.tmp"))


def test_the_finished_runs_are_read_after_the_lock_is_taken(tmp_path: Path, tv_data_dir: Path, capsys, monkeypatch):
    """A study that finishes just before this one takes the lock: its rows count as done, nothing runs twice."""
    import contextlib

    from dropout_lab import study_runner

    argv, out, _ = tiny_study(tmp_path, tv_data_dir)
    argv = [*argv[:3], "--seeds", "0", *argv[3:]]
    cli_main(argv)
    finished = (out / "results.csv").read_text()
    (out / "results.csv").unlink()  # as if the other study were still running its last runs
    real = study_runner._exclusive

    @contextlib.contextmanager
    def other_study_finishes_first(folder: Path, option: str):
        if option == "--out":
            (out / "results.csv").write_text(finished)  # ... and wrote them just before the lock is free
        with real(folder, option):
            yield

    monkeypatch.setattr(study_runner, "_exclusive", other_study_finishes_first)
    capsys.readouterr()
    cli_main(argv)
    assert "2 done, 0 to run" in capsys.readouterr().out
    assert len(read_rows(out / "results.csv")) == 2


@pytest.mark.parametrize("held", ["out", "logdir"])
def test_a_study_in_use_by_another_process_is_refused(tmp_path: Path, tv_data_dir: Path, capsys, held: str) -> None:
    """Its results folder, and also its TensorBoard folder (a study with another --out would delete its runs)."""
    import fcntl

    argv, out, logs = tiny_study(tmp_path, tv_data_dir)
    folder = out if held == "out" else logs / "tiny"
    folder.mkdir(parents=True)
    (folder / "marker").write_text("a run of the study holding the lock")
    with (folder / ".study.lock").open("w") as lock:  # what a running study holds
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "in use by another running study" in err and f"another --{held}" in err and "Traceback" not in err
    assert not (out / "results.csv").exists() and (folder / "marker").exists()
    assert not list(logs.glob("tiny/*/seed*"))  # no run was started (and none deleted)


def test_a_diverging_run_ends_the_study_with_its_cell_and_seed(tmp_path: Path, tv_data_dir: Path, capsys) -> None:
    body = TINY.replace("grid:\n  model.init_args.dropouts: [[0.5, 0.5], [0.0, 0.0]]\n",
                        "cells:\n  calm: {}\n  wild: {model.init_args.optimizer.init_args.lr: 10000.0}\n")  # fmt: skip
    argv, out, _ = tiny_study(tmp_path, tv_data_dir)
    write_study(Path(argv[2]), body.replace("seeds: 2", "seeds: [4]"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 3 and "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: cell wild seed 4: training diverged") and "run.log" in line, line
    assert [r["cell"] for r in read_rows(out / "results.csv")] == ["calm"]  # the finished run's row is kept


def _worker_wild_fails_while_others_run(threads: int, study, cell: Cell, seed: int, logdir: Path, extra, keep):
    """A stand-in for a study's worker: ``wild`` fails at once; the other cell is still running then and finishes
    after it: ``calm`` with a result, ``broken`` with an error without a message, ``wild2`` diverging too."""
    import time

    from dropout_lab.reliability import DivergenceError

    marker = logdir / "wild_failed"
    if cell.name == "wild":
        marker.write_text("")
        raise DivergenceError("cell wild seed 4: training diverged: the training loss was not finite at step 0")
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)  # well after the main process has seen wild's error
    if cell.name == "broken":
        raise AssertionError
    if cell.name == "wild2":
        raise DivergenceError(f"cell wild2 seed {seed}: training diverged: the training loss was not finite at step 1")
    if cell.name == "bad":  # run_one's config errors name the cell alone
        raise StudyError("cell bad: model.dropouts: expected 2 probabilities")
    return {"cell": cell.name, "seed": seed, "after_the_failure": marker.exists()}, []


@pytest.mark.parametrize("other", ["calm", "broken", "wild2", "bad"])
def test_with_jobs_a_failure_keeps_the_runs_in_flight_and_starts_no_other(
    tmp_path: Path, monkeypatch, capsys, other: str
) -> None:
    from dropout_lab import study_runner
    from dropout_lab.reliability import DivergenceError
    from dropout_lab.studies import _print_error

    body = TINY.replace("grid:\n  model.init_args.dropouts: [[0.5, 0.5], [0.0, 0.0]]\n",
                        f"cells:\n  wild: {{}}\n  {other}: {{}}\n  later: {{}}\n")  # fmt: skip
    study = load_study(write_study(tmp_path / "s.yaml", body.replace("seeds: 2", "seeds: [4]")))
    monkeypatch.setattr(study_runner, "_run_in_worker", _worker_wild_fails_while_others_run)
    todo = [(cell, 4) for cell in study.cells]
    got = []
    with pytest.raises(DivergenceError, match="not finite at step 0") as failure:
        for item in study_runner._runs(study, todo, tmp_path, [], False, jobs=2):
            got.append(item)
    # the other cell was in flight when wild failed: its result still comes back; `later` (queued) never started
    rows = [(cell.name, row) for cell, _, row, _ in got]
    assert rows == ([("calm", {"cell": "calm", "seed": 4, "after_the_failure": True})] if other == "calm" else [])
    _print_error(failure.value)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: cell wild seed 4: training diverged: the training loss was not finite at step 0"
    also = {
        "calm": [],
        "broken": ["also failed: cell broken seed 4: AssertionError"],
        "wild2": ["also failed: cell wild2 seed 4: training diverged: the training loss was not finite at step 1"],
        "bad": ["also failed: cell bad seed 4: model.dropouts: expected 2 probabilities"],
    }
    assert lines[1:] == also[other]
