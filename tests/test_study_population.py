"""``study --population``: a study's cells × seeds as the members of one PopulationMLP run, reported as a study."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from dropout_lab.cli import main as cli_main
from dropout_lab.models import DropoutMLP
from dropout_lab.population import PopulationMLP
from dropout_lab.study_report import RESULT_FIELDS, read_rows

ROOT = Path(__file__).resolve().parents[1]
RUN_ARGS = [
    "--trainer.accelerator=cpu", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2", "--data.val_size=100", "--data.batch_size=32",
    "--trainer.enable_progress_bar=false",
]  # fmt: skip
ARGS = f"args: {json.dumps(RUN_ARGS)}\n"
GRID = (
    f"base: {ROOT / 'configs/mlp.yaml'}\n"
    "grid:\n  model.init_args.dropouts: [[0.5, 0.5], [0.0, 0.0]]\n"
    "seeds: [3, 5]\nepochs: 2\nfigure: curves\n" + ARGS
)
# no dropout, two weight decays: every member is deterministic, so it can be checked against a run of its own
DETERMINISTIC = (
    f"base: {ROOT / 'configs/mlp.yaml'}\n"
    "grid:\n  model.init_args.optimizer.init_args.weight_decay: [0.0, 0.05]\n"
    "  model.init_args.dropouts: [[0.0, 0.0]]\n"
    "seeds: [3, 5]\nepochs: 2\nfigure: heatmap\n" + ARGS
)


def study_argv(tmp_path: Path, data_dir: Path, body: str, *options: str) -> tuple[list[str], Path]:
    (tmp_path / "s.yaml").write_text(body)
    out = tmp_path / "out"
    argv = ["study", "--config", str(tmp_path / "s.yaml"), "--out", str(out), "--logdir", str(tmp_path / "logs")]
    return [*argv, "--population", *options, "--", "--data.data_dir", str(data_dir)], out


def test_population_study_writes_the_rows_curves_and_report_of_separate_runs(
    tmp_path: Path, tv_data_dir: Path, capsys
) -> None:
    argv, out = study_argv(tmp_path, tv_data_dir, GRID)
    cli_main(argv)
    printed = capsys.readouterr().out
    assert "2 cells × 2 seeds = 4 members in one run" in printed and "population: 4 runs in" in printed
    rows = read_rows(out / "results.csv")
    assert [(r["cell"], r["seed"]) for r in rows] == [
        ("dropouts=0.5,0.5", "3"), ("dropouts=0.5,0.5", "5"), ("dropouts=0,0", "3"), ("dropouts=0,0", "5"),
    ]  # fmt: skip
    assert set(rows[0]) == set(RESULT_FIELDS) and all(r["max_epochs"] == "2" and r["steps"] == "6" for r in rows)
    # each row's figures are its own member's: test/acc/c<cell>s<j> and the last/best of val/acc/c<cell>s<j>
    from dropout_lab.study_report import read_scalars

    scalars = read_scalars(tmp_path / "logs" / "s" / "population" / "seeds3_5")
    for m, row in enumerate(rows):
        member = f"c{m // 2}s{m % 2}"
        val = [v for _, v in scalars[f"val/acc/{member}"]]
        assert len(val) == 2 and float(row["val_acc"]) == pytest.approx(val[-1])
        assert float(row["best_val_acc"]) == pytest.approx(max(val))
        assert float(row["train_acc"]) == pytest.approx(scalars[f"train/acc/{member}"][-1][1])
        assert float(row["gap"]) == pytest.approx(float(row["train_acc"]) - float(row["val_acc"]))
    accs = [float(r["test_acc"]) for r in rows]
    population_acc = scalars["test/acc"][-1][1]
    assert population_acc == pytest.approx(sum(accs) / 4, abs=1e-6)
    curves = read_rows(out / "curves.csv")
    for tag in ("train/acc", "val/acc", "val/loss"):
        assert sum(1 for c in curves if c["tag"] == tag and c["cell"] == "dropouts=0,0" and c["seed"] == "5") == 2
    text = (out / "s.md").read_text()
    assert "Every cell × seeds [3, 5] ran as the 4 members of one PopulationMLP run" in text
    assert "each member trained on the data order of its seed" in text
    assert "each member also started from the weights of a separate run of its seed" in text
    assert "differs from a separate run in its masks and in float rounding" in text
    assert yaml.safe_load((out / "population.yaml").read_text())["data"]["shuffle_seeds"] == [3, 5]
    assert text.count(" ± ") >= 6 and (out / "s.png").stat().st_size > 1000
    assert "PopulationMLP" in (out / "population.yaml").read_text()
    assert not (tmp_path / "logs" / "s" / "population" / "seeds3_5" / "checkpoints").exists()
    cli_main(argv)  # finished: nothing to run again
    assert "4 done, 0 to run" in capsys.readouterr().out and len(read_rows(out / "results.csv")) == 4


def test_without_dropout_every_member_is_the_separate_run_of_its_cell_and_seed(
    tmp_path: Path, tv_data_dir: Path
) -> None:
    """The same deterministic study (no dropout, two weight decays) as separate runs and as one population.

    Without dropout nothing is drawn during training, so each member, which starts from its seed's weights
    and trains on its seed's data order, must reproduce the separate run of its (cell, seed) up to rounding
    (``baddbmm`` against ``nn.Linear``).
    """
    argv, out = study_argv(tmp_path, tv_data_dir, DETERMINISTIC)
    cli_main(argv)
    separate = tmp_path / "separate"
    cli_main([*argv[: argv.index("--out") + 1], str(separate), "--logdir", str(tmp_path / "logs2"), *argv[-3:]])
    members = {(r["cell"], r["seed"]): r for r in read_rows(out / "results.csv")}
    runs = {(r["cell"], r["seed"]): r for r in read_rows(separate / "results.csv")}
    assert len(members) == 4 and members.keys() == runs.keys()
    for key, row in members.items():
        assert float(row["test_loss"]) == pytest.approx(float(runs[key]["test_loss"]), rel=1e-4), key
        assert float(row["test_acc"]) == pytest.approx(float(runs[key]["test_acc"]), abs=0.011)  # one image at most
    curves = [read_rows(d / "curves.csv") for d in (out, separate)]
    key = ("cell", "seed", "step")
    val = [{tuple(c[k] for k in key): float(c["value"]) for c in rows if c["tag"] == "val/loss"} for rows in curves]
    assert len(val[0]) == 8 and val[0].keys() == val[1].keys()  # 2 epochs × 4 runs
    assert all(v == pytest.approx(val[1][key], rel=1e-4) for key, v in val[0].items())
    assert len({round(float(r["test_loss"]), 5) for r in members.values()}) == 4  # seeds and decays all matter


def test_a_crashed_population_resumes_from_its_last_checkpoint(tmp_path: Path, tv_data_dir: Path, capsys) -> None:
    argv, out = study_argv(tmp_path, tv_data_dir, GRID)
    cli_main([*argv[:-3], "--keep_checkpoints", *argv[-3:]])
    first = read_rows(out / "results.csv")
    for name in ("results.csv", "curves.csv", "population.json"):  # killed after the fit, before the rows
        (out / name).unlink()
    cli_main(argv)
    printed = capsys.readouterr().out
    assert "; resuming from " in printed and "last.ckpt" in printed
    again = read_rows(out / "results.csv")
    keys = ("cell", "seed", "test_acc", "test_loss", "val_acc", "best_val_acc", "train_acc", "steps")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in first]
    assert "in the attempt that resumed and finished it" in (out / "s.md").read_text()


@pytest.mark.parametrize(
    ("body", "options", "message"),
    [
        ("variants", (), "cell scratch sets config; a population varies only model.init_args.dropouts"),
        ("lenet", (), "trains dropout_lab.models.LeNet; only dropout_lab.models.DropoutMLP studies"),
        ("hidden", (), "a population varies only model.init_args.dropouts"),
        ("grid", ("--jobs", "2"), "--jobs: a --population study is one run"),
        ("variance", (), "the variance figure need separate runs"),
        ("adam", (), "base optimizer is torch.optim.Adam, so model.init_args.optimizer.init_args.weight_decay cannot"),
    ],
)
def test_what_a_population_cannot_express_is_a_one_line_error(
    tmp_path: Path, tv_data_dir: Path, capsys, body: str, options: tuple[str, ...], message: str
) -> None:
    bodies = {
        "variants": (ROOT / "configs/studies/variants.yaml").read_text().replace("base: ", f"base: {ROOT}/")
        .replace("config: ", f"config: {ROOT}/"),
        "lenet": GRID.replace("configs/mlp.yaml", "configs/lenet.yaml"),
        "hidden": GRID.replace("model.init_args.dropouts: [[0.5, 0.5], [0.0, 0.0]]",
                               "model.init_args.hidden_sizes: [[16, 16], [32, 32]]"),
        "grid": GRID,
        "variance": GRID.replace("figure: curves", "figure: variance"),
        "adam": DETERMINISTIC + "# the base optimizer swapped below\n",
    }  # fmt: skip
    argv, out = study_argv(tmp_path, tv_data_dir, bodies[body], *options)
    if body == "adam":
        config = (ROOT / "configs/mlp.yaml").read_text().replace("torch.optim.SGD", "torch.optim.Adam")
        (tmp_path / "adam.yaml").write_text(config)
        study = bodies[body].replace(str(ROOT / "configs/mlp.yaml"), str(tmp_path / "adam.yaml"))
        (tmp_path / "s.yaml").write_text(study)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (out / "results.csv").exists()


@pytest.mark.parametrize("optimizer", ["torch.optim.SGD", "SGD", "torch.optim.sgd.SGD", "torch.optim.AdamW", "AdamW"])
def test_the_base_optimizers_weight_decay_is_kept(tmp_path: Path, optimizer: str) -> None:
    """SGD's becomes every member's own decay; AdamW's (an explicit 0, not its default 0.01) stays with AdamW."""
    from dropout_lab.studies import load_study
    from dropout_lab.study_population import population_config

    base = yaml.safe_load((ROOT / "configs/mlp.yaml").read_text())
    sgd = optimizer.endswith("SGD")
    decay = 1e-3 if sgd else 0.0  # AdamW: an explicit 0, which must not become AdamW's default 0.01
    opt_args = {"lr": 0.01, "weight_decay": decay}
    base["model"]["init_args"]["optimizer"] = {"class_path": optimizer, "init_args": opt_args}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "s.yaml").write_text(GRID.replace(str(ROOT / "configs/mlp.yaml"), str(tmp_path / "base.yaml")))
    study = load_study(tmp_path / "s.yaml")
    pop = population_config(study, study.cells)["model"]["init_args"]
    if sgd:
        assert pop["optimizer"]["init_args"] == {"lr": 0.01} and pop["weight_decays"] == [1e-3, 1e-3]
    else:
        assert pop["optimizer"]["init_args"] == {"lr": 0.01, "weight_decay": 0.0} and pop["weight_decays"] == [0.0, 0.0]


def test_an_optimizer_given_by_its_class_name_alone(tmp_path: Path) -> None:
    from dropout_lab.studies import StudyError, load_study
    from dropout_lab.study_population import population_config

    base = yaml.safe_load((ROOT / "configs/mlp.yaml").read_text())
    base["model"]["init_args"]["optimizer"] = "torch.optim.Adam"  # as fit accepts it: Adam's defaults
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "s.yaml").write_text(GRID.replace(str(ROOT / "configs/mlp.yaml"), str(tmp_path / "base.yaml")))
    study = load_study(tmp_path / "s.yaml")
    pop = population_config(study, study.cells)["model"]["init_args"]
    assert pop["optimizer"] == {"class_path": "torch.optim.Adam", "init_args": {}} and pop["weight_decays"] == [0, 0]
    base["model"]["init_args"]["optimizer"] = ["torch.optim.Adam"]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(StudyError, match="optimizer must be a class name or a mapping with class_path"):
        population_config(study, study.cells)


def test_an_optimizer_that_cannot_be_imported_is_a_study_error(tmp_path: Path) -> None:
    from dropout_lab.studies import StudyError, load_study
    from dropout_lab.study_population import population_config

    base = yaml.safe_load((ROOT / "configs/mlp.yaml").read_text())
    base["model"]["init_args"]["optimizer"] = {"class_path": "torch.optim.NoSuchSGD", "init_args": {"lr": 0.01}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "s.yaml").write_text(GRID.replace(str(ROOT / "configs/mlp.yaml"), str(tmp_path / "base.yaml")))
    study = load_study(tmp_path / "s.yaml")
    with pytest.raises(StudyError, match=r"optimizer torch\.optim\.NoSuchSGD cannot be imported"):
        population_config(study, study.cells)


def test_a_partly_finished_cell_is_refused_and_dry_run_writes_nothing(
    tmp_path: Path, tv_data_dir: Path, capsys
) -> None:
    argv, out = study_argv(tmp_path, tv_data_dir, GRID)
    cli_main([*argv[:-3], "--dry_run", *argv[-3:]])
    printed = capsys.readouterr().out
    assert "population of 2 cells × 2 seeds: python -m dropout_lab fit --config" in printed
    assert "class_path: dropout_lab.population.PopulationMLP" in printed and "init_seeds:\n    - 3\n    - 5" in printed
    assert not out.exists()
    out.mkdir()
    with (out / "results.csv").open("w", newline="") as f:  # seed 3 of the first cell finished by the runner
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        finished = {"cell": "dropouts=0.5,0.5", "seed": "3", "max_epochs": "2", "options": ""}  # options: unrecorded
        writer.writerow({k: "0" for k in RESULT_FIELDS} | finished)
    with pytest.raises(SystemExit):
        cli_main(argv)
    assert "cell dropouts=0.5,0.5 has finished seeds [3]" in capsys.readouterr().err


def test_init_seeds_start_every_cell_of_a_seed_from_the_same_weights() -> None:
    model = PopulationMLP((16,), [(0.5,), (0.1,), (0.0,)], members_per_cell=2, init_seeds=[7, 9])
    first = model.net[0].weight
    assert torch.equal(first[0], first[2]) and torch.equal(first[1], first[5])  # c0s0 = c1s0, c0s1 = c2s1
    assert not torch.equal(first[0], first[1])
    seeded = PopulationMLP((16,), [(0.5,)], members_per_cell=2, init_seed=7)  # init_seed + m: 7, 8
    assert torch.equal(seeded.net[0].weight[0], first[0]) and not torch.equal(seeded.net[0].weight[1], first[1])
    torch.manual_seed(9)  # what seed_everything(9) does before the CLI builds a separate run's model
    alone = [m for m in DropoutMLP(hidden_sizes=(16,), dropouts=(0.5,)).net if isinstance(m, torch.nn.Linear)]
    for linear, stacked in zip(alone, [model.net[0], model.net[3]], strict=True):
        for member in (1, 3, 5):  # c0s1, c1s1, c2s1: seed 9
            assert torch.equal(stacked.weight[member], linear.weight.T)
            assert torch.equal(stacked.bias[member, 0], linear.bias)
    with pytest.raises(ValueError, match=r"model\.init_seeds: give one seed per member"):
        PopulationMLP((16,), [(0.5,)], members_per_cell=2, init_seeds=[1, 2, 3])


def test_diverged_members_are_named_by_cell_and_seed(tmp_path: Path, tv_data_dir: Path, capsys) -> None:
    """SGD with wd = 1e6 multiplies the weights by about -1e5 a step: that cell's members (and no other) blow up."""
    body = DETERMINISTIC.replace("weight_decay: [0.0, 0.05]", "weight_decay: [0.0, 1000000.0]")
    argv, out = study_argv(tmp_path, tv_data_dir, body)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 3 and "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: --population: training diverged: the training loss was not finite"), line
    wild = "weight_decay=1e+06+dropouts=0,0"
    assert f"members with non-finite weights: {wild} seed 3, {wild} seed 5 (epoch" in line, line
    assert "weight_decay=0+" not in line
    assert not (out / "results.csv").exists()
