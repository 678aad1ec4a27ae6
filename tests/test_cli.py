"""The command line end to end: ``python -m dropout_lab`` in a subprocess on synthetic data, and ``main()`` in process.

Subprocess runs cost ~8 s of imports each on a small machine, so they are few and each checks several things;
the error cases and the help texts that need no separate interpreter run ``main()`` in this process.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dropout_lab import idx
from dropout_lab.cli import main
from dropout_lab.cli_text import condense_error
from dropout_lab.data import FashionMNISTDataModule
from dropout_lab.models import DropoutMLP

REPO = Path(__file__).resolve().parents[1]
MLP = REPO / "configs" / "mlp.yaml"
REQUIRED_TAGS = {"train/loss", "train/acc", "val/loss", "val/acc", "test/acc"}


def cli_env(gz_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PL_GLOBAL_SEED", idx.ENV_DIR)}
    env[idx.ENV_DIR] = str(gz_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # runs go side by side; tiny nets gain nothing from threads
    return env


def run_cli(args: list[str], workdir: Path, gz_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m dropout_lab ARGS`` in ``workdir`` (so a stray relative path lands there, not in the repo)."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "dropout_lab", *args]
    try:
        return subprocess.run(argv, cwd=workdir, env=cli_env(gz_dir), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(argv)} timed out after {timeout} s:\n{err.stdout}\n{err.stderr}")


def local(workdir: Path) -> list[str]:
    """Arguments that keep a run's files under ``workdir`` and on the CPU."""
    return [
        "--data.data_dir",
        str(workdir / "data"),
        "--trainer.logger.init_args.save_dir",
        str(workdir / "logs"),
        "--trainer.default_root_dir",
        str(workdir),
        "--trainer.accelerator",
        "cpu",
    ]


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run: tag → [(step, value)], read from all of its TensorBoard events files."""
    found: dict[str, list[tuple[int, float]]] = {}
    files = sorted(run_dir.glob("events.out.tfevents.*"))
    assert files, f"no events file in {run_dir}"
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- subprocess runs ------------------------------------------------------------------------------------------


def fit_args(workdir: Path, *extra: str) -> list[str]:
    """A short real fit on the synthetic set: 500 training + 100 validation images, one epoch, every step logged."""
    args = ["fit", "--config", str(MLP), *local(workdir), "--trainer.max_epochs", "1", "--data.val_size", "100"]
    return [*args, "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false", *extra]


RUNS = {
    "fit": lambda w: fit_args(w),
    "fit_no_test": lambda w: fit_args(w, "--test_after_fit", "false"),  # same seed: also the determinism check
    "fast_dev_run": lambda w: (
        ["fit", "--config", str(MLP), *local(w), "--trainer.fast_dev_run", "true", "--data.val_size", "100"]
    ),
    "print_config": lambda w: ["fit", "--config", str(MLP), "--print_config"],
    "fit_help": lambda w: ["fit", "--help"],
    "bad_p": lambda w: ["fit", "--config", str(MLP), *local(w), "--model.dropouts", "[1.5, 0.5]"],
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory, shared_gz_dir: Path) -> dict[str, tuple]:
    """Every subprocess run of this file, started side by side (imports dominate): name → (result, workdir)."""
    workdirs = {name: tmp_path_factory.mktemp(name) for name in RUNS}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {
            name: pool.submit(run_cli, make_args(workdirs[name]), workdirs[name], shared_gz_dir)
            for name, make_args in RUNS.items()
        }
        return {name: (future.result(), workdirs[name]) for name, future in futures.items()}


def run_dir_of(workdir: Path) -> Path:
    runs = sorted((workdir / "logs").glob("*/version_*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_fit_writes_a_complete_run(cli_runs) -> None:
    result, workdir = cli_runs["fit"]
    assert result.returncode == 0, explain(result)
    assert "Traceback" not in result.stderr
    run = run_dir_of(workdir)
    assert run.parent.name == "mlp"

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["seed_everything"] == 0
    assert config["model"]["class_path"] == "dropout_lab.models.DropoutMLP"
    assert config["model"]["init_args"]["dropouts"] == [0.5, 0.5]
    assert config["data"]["val_size"] == 100
    assert config["data"]["data_dir"] == str(workdir / "data")
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["dropouts"] == [0.5, 0.5]
    assert hparams["val_size"] == 100
    assert hparams["optimizer"] == "SGD" and hparams["optimizer.lr"] == 0.1

    checkpoints = {p.name for p in (run / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in checkpoints
    best = checkpoints - {"last.ckpt"}
    assert len(best) == 1, checkpoints
    assert best.pop() in result.stdout + result.stderr  # the test ran on the best checkpoint

    tags = scalars(run)
    assert set(tags) >= REQUIRED_TAGS, sorted(tags)
    assert len(tags["train/loss"]) == 2  # 500 training images, batch 256, logged every step
    acc = re.search(r"test/acc\s+([0-9.]+)", result.stdout)
    assert acc, result.stdout
    assert float(acc.group(1)) == pytest.approx(tags["test/acc"][-1][1], abs=1e-6)

    assert sorted(p.name for p in (workdir / "data" / "FashionMNIST" / "raw").iterdir()) == sorted(idx.FILES.values())


def test_fit_without_test(cli_runs) -> None:
    result, workdir = cli_runs["fit_no_test"]
    assert result.returncode == 0, explain(result)
    tags = scalars(run_dir_of(workdir))
    assert {"train/loss", "val/acc"} <= set(tags)
    assert "test/acc" not in tags
    assert "test/acc" not in result.stdout


def test_same_seed_same_numbers(cli_runs) -> None:
    (a, dir_a), (b, dir_b) = cli_runs["fit"], cli_runs["fit_no_test"]
    assert a.returncode == 0 and b.returncode == 0
    sa, sb = scalars(run_dir_of(dir_a)), scalars(run_dir_of(dir_b))
    for tag in ("val/acc", "val/loss", "train/loss", "train/acc"):
        assert sa[tag] == sb[tag], tag


def test_fast_dev_run(cli_runs) -> None:
    result, _ = cli_runs["fast_dev_run"]
    assert result.returncode == 0, explain(result)
    assert "Traceback" not in result.stderr


def test_print_config(cli_runs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    result, workdir = cli_runs["print_config"]
    assert result.returncode == 0, explain(result)
    assert "dropout_lab.models.DropoutMLP" in result.stdout and "dropouts" in result.stdout
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["init_args"]["dropouts"] == [0.5, 0.5]
    assert printed["data"]["val_size"] == 5000
    assert printed["test_after_fit"] is True
    assert printed["checkpoint"]["monitor"] == "val/acc"
    assert not any(workdir.iterdir()), "print_config wrote files"

    saved = tmp_path / "printed.yaml"  # the printed config reproduces itself
    saved.write_text(result.stdout)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(saved), "--print_config"])
    assert info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out) == printed


def test_fit_help(cli_runs) -> None:
    result, _ = cli_runs["fit_help"]
    assert result.returncode == 0, explain(result)
    text = " ".join(result.stdout.split())  # (line breaks depend on the terminal width)
    assert text.startswith("usage: python -m dropout_lab")
    for name in inspect.signature(FashionMNISTDataModule.__init__).parameters:
        if name != "self":
            assert f"--data.{name} " in text, name
    for option in ("--data.val_size", "--data.loader", "--test_after_fit", "--checkpoint.monitor", "--model.help"):
        assert option in text
    assert "dropout_lab.models.DropoutMLP" in text
    assert "held out of the 60k training set" in text  # the docstrings reach the help


def test_bad_value_exits_2_without_traceback(cli_runs) -> None:
    result, workdir = cli_runs["bad_p"]
    assert result.returncode == 2, explain(result)
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: model.dropouts"), result.stderr
    assert "1.5" in lines[0]
    assert not (workdir / "logs").exists()


# --- in process -----------------------------------------------------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_gz_dir: Path) -> Path:
    """Run ``main()`` from an empty folder, with ``$FASHION_MNIST_DIR`` at the synthetic gzip files."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(idx.ENV_DIR, str(shared_gz_dir))
    return tmp_path


def run_main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int | str | None, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


BAD = [
    pytest.param(["--model.dropouts", "[1.5, 0.5]"], "model.dropouts", id="p_above_1"),
    pytest.param(["--model.dropouts", "[0.5, -0.1]"], "model.dropouts", id="p_negative"),
    pytest.param(["--model.dropouts", "[0.5, 0.5, 0.5]"], "model.dropouts", id="p_count"),
    pytest.param(["--model.input_dropout", "1.0"], "model.input_dropout", id="input_p_1"),
    pytest.param(["--data.batch_size", "0"], "data.batch_size", id="batch_size_0"),
    pytest.param(["--data.loader", "numpy"], "data.loader", id="loader"),
    pytest.param(["--data.val_size", "600"], "data.val_size", id="val_size_all"),
    pytest.param(["--data.val_size", "100000"], "data.val_size", id="val_size_huge"),
    pytest.param(["--data.max_shift", "15"], "data.max_shift", id="shift_too_large"),
    pytest.param(["--model.micro_batch_size", "0"], "model.micro_batch_size", id="micro_batch_0"),
    pytest.param(["--float32_matmul_precision", "low"], "float32_matmul_precision", id="matmul_precision"),
    pytest.param(["--config", "does-not-exist.yaml"], "does-not-exist.yaml", id="missing_config"),
    pytest.param(["--model.init_args.no_such_option", "1"], "no_such_option", id="unknown_model_key"),
    pytest.param(["--trainer.no_such_option", "1"], "no_such_option", id="unknown_trainer_key"),
    pytest.param(["--trainer.max_epoch", "3"], "--trainer.max_epoch 3", id="abbreviated_option"),
    pytest.param(["--data.batch_size", "many"], "data.batch_size", id="wrong_type"),
    pytest.param(["--model.dropouts", "0.5"], "model.dropouts", id="p_not_a_list"),
    pytest.param(["--ckpt_path", "no-such.ckpt"], "ckpt_path", id="missing_checkpoint"),
    pytest.param(["--ckpt_path", "last"], "ckpt_path", id="no_last_checkpoint"),
]


@pytest.mark.parametrize(("extra", "key"), BAD)
def test_bad_input_names_the_key(extra: list[str], key: str, in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["fit", "--config", str(MLP), *local(in_tmp), "--trainer.max_epochs", "1", *extra]
    code, _, err = run_main(args, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and key in lines[0], err
    assert not (in_tmp / "logs").exists(), "a rejected run wrote logs"


def test_corrupt_data_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, idx_kit
) -> None:
    gz = tmp_path / "gz"
    paths = idx_kit.write_set(gz, gz=True)
    paths["train_labels"].write_bytes(paths["train_labels"].read_bytes()[:-20])  # a truncated gzip file
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(idx.ENV_DIR, str(gz))
    code, _, err = run_main(["fit", "--config", str(MLP), *local(tmp_path / "run")], capsys)
    assert code == 2 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert "train-labels-idx1-ubyte" in line, line
    assert not (tmp_path / "run" / "logs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available here")
def test_gpu_without_gpu(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main(["fit", "--config", str(MLP), *local(in_tmp), "--trainer.accelerator", "gpu"], capsys)
    assert code == 2
    assert error_lines(err) and "trainer.accelerator" in error_lines(err)[0], err


def test_missing_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # the autouse fixture has emptied every source
    code, _, err = run_main(["fit", "--config", str(MLP), *local(tmp_path)], capsys)
    assert code == 2
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert "data.data_dir" in line and "apt-get install dataset-fashion-mnist" in line
    assert not (tmp_path / "data").exists()


def test_fit_without_validation_keeps_last_checkpoint(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["fit", "--config", str(MLP), *local(in_tmp), "--data.val_size", "0", "--trainer.max_epochs", "1"]
    main([*args, "--trainer.enable_progress_bar", "false"])
    out, err = capsys.readouterr()
    assert not error_lines(err), err
    assert re.search(r"test/acc\s+[0-9.]+", out), out  # tested the last weights
    (run,) = (in_tmp / "logs").glob("*/version_*")
    assert "last.ckpt" in {p.name for p in (run / "checkpoints").iterdir()}
    tags = scalars(run)
    assert "val/acc" not in tags and "test/acc" in tags


@pytest.mark.parametrize("config_of", ["repo", "run"])
def test_test_subcommand_on_last_checkpoint(
    config_of: str, cli_runs, in_tmp: Path, capsys: pytest.CaptureFixture
) -> None:
    result, workdir = cli_runs["fit"]
    assert result.returncode == 0, explain(result)
    run = run_dir_of(workdir)
    config = MLP if config_of == "repo" else run / "config.yaml"
    args = ["test", "--config", str(config), *local(in_tmp), "--data.val_size", "100"]
    main([*args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    out, err = capsys.readouterr()
    assert not error_lines(err), err
    after_fit = re.search(r"test/acc\s+([0-9.]+)", result.stdout)
    again = re.search(r"test/acc\s+([0-9.]+)", out)
    assert after_fit and again, out
    assert again.group(1) == after_fit.group(1)  # one epoch: the best checkpoint is the last one
    (tested,) = (in_tmp / "logs").glob("*/version_*/config.yaml")  # the test run's own folder
    header = [line for line in tested.read_text().splitlines() if line.startswith("#")]
    assert f"# re-run:  python -m dropout_lab test --config {tested}" in header, header
    assert not any(line.startswith("# resume:") for line in header), header  # nothing was trained there
    fit_header = (run / "config.yaml").read_text()
    assert "# re-run:  python -m dropout_lab fit --config" in fit_header and "# resume:" in fit_header


def test_help(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_main(["--help"], capsys)
    assert code in (0, None)
    for word in ("fit", "validate", "test", "predict", "FashionMNIST", "--test_after_fit"):
        assert word in out


def test_model_help_documents_every_argument(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_main(["fit", "--model.help", "DropoutMLP"], capsys)
    assert code in (0, None)
    out = " ".join(out.split())
    for name in inspect.signature(DropoutMLP.__init__).parameters:
        if name != "self":
            assert f"--model.{name}" in out, name
    assert "dropout probability on the input pixels" in out


def documented_callables() -> list[tuple[str, str, list[str]]]:
    """(name, docstring, parameter names) of every public class and function of the package with an Args section."""
    import importlib
    import pkgutil

    import dropout_lab

    found = []
    for info in pkgutil.iter_modules(dropout_lab.__path__):
        if info.name == "__main__":  # runs the CLI when imported
            continue
        module = importlib.import_module(f"dropout_lab.{info.name}")
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != module.__name__ or name.startswith("_"):
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj) or ""
                init = obj.__init__ if inspect.isclass(obj) else obj
                if "Args:" in doc:
                    params = [p for p in inspect.signature(init).parameters if p not in ("self", "args", "kwargs")]
                    found.append((f"{module.__name__}.{name}", doc, params))
    return found


def test_every_args_section_parses(in_tmp: Path) -> None:
    """jsonargparse guesses the docstring style; a line that starts with a Sphinx role (``:func:`x` ...``) makes
    it read the docstring as reST, and the ``--help`` of that class loses every argument's description."""
    import docstring_parser

    checked = documented_callables()
    assert len(checked) > 30
    for name, doc, params in checked:
        described = {p.arg_name for p in docstring_parser.parse(doc).params}
        assert described, f"{name}: its Args section does not parse"
        assert described >= {p for p in params if p in doc}, name


def test_model_then_help_documents_model(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_main(["fit", "--model", "dropout_lab.models.DropoutMLP", "--help"], capsys)
    assert code in (0, None)
    assert "dropouts" in out and "input_dropout" in out


def test_condense_error() -> None:
    nested = (
        'Parser key "model":\n'
        "  Does not validate against any of the types in typing.Optional[ClassifierModule]:\n"
        "    - Problem with given class_path 'dropout_lab.models.DropoutMLP':\n"
        '        Parser key "dropouts":\n'
        "          Not of type Probability: 1.5 does not conform to restriction v>=0 and v<1\n"
        "    - Expected a <class 'NoneType'>\n"
    )
    assert (
        condense_error(nested)
        == "model.dropouts: Not of type Probability: 1.5 does not conform to restriction v>=0 and v<1"
    )
    plain = "model.dropouts: 3 values for 2 hidden layers"
    assert condense_error(plain) == plain
    assert condense_error('Parser key "data.batch_size": bad') == "data.batch_size: bad"
    assert condense_error("") == "invalid arguments"
    assert condense_error("one\ntwo") == "one"


def test_a_file_that_is_no_checkpoint_is_one_error_line(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    """Any file but a checkpoint: text, a truncated checkpoint, a torch file without weights."""
    text, truncated, plain = in_tmp / "notes.ckpt", in_tmp / "cut.ckpt", in_tmp / "list.ckpt"
    text.write_text("not a checkpoint\n" * 50)
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, in_tmp / "whole.ckpt")
    truncated.write_bytes((in_tmp / "whole.ckpt").read_bytes()[:2000])
    torch.save([1, 2], plain)
    expected = {text: "is not a readable checkpoint", truncated: "is not a readable checkpoint",
                plain: "is not a Lightning checkpoint (it holds no state_dict)"}  # fmt: skip
    for subcommand in ("fit", "test"):
        for path, message in expected.items():
            args = [subcommand, "--config", str(MLP), *local(in_tmp), "--ckpt_path", str(path)]
            code, _, err = run_main(args, capsys)
            assert code == 2 and "Traceback" not in err, err
            (line,) = error_lines(err)
            assert line.startswith(f"error: ckpt_path: {path} ") and message in line, line
    assert not (in_tmp / "logs").exists()


@pytest.mark.parametrize("subcommand", ["mc", "rotated"])
def test_mc_commands_need_a_checkpoint(subcommand: str, in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main([subcommand, "--config", str(MLP), *local(in_tmp), "--samples", "2"], capsys)
    assert code == 2 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert line.startswith(f"error: ckpt_path: {subcommand} needs the weights of a trained run"), line
    assert not list(in_tmp.glob("*.p*")), "nothing is written"


def test_test_without_a_checkpoint_warns_about_initial_weights(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["test", "--config", str(MLP), *local(in_tmp), "--data.val_size", "100", "--trainer.limit_test_batches", "2"]
    main([*args, "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    assert "warning: no --ckpt_path: test uses the model's initial (untrained) weights" in err, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--target_class", "12"], "target_class: 12 is not a class; FashionMNIST has 0–9"),
     (["--index", "5000"], "index: 5000 is past the")],
)  # fmt: skip
def test_rotated_out_of_range_is_one_error_line(
    extra: list[str], message: str, cli_runs, in_tmp: Path, capsys: pytest.CaptureFixture
) -> None:
    result, workdir = cli_runs["fit"]
    assert result.returncode == 0, explain(result)
    ckpt = run_dir_of(workdir) / "checkpoints" / "last.ckpt"
    args = ["rotated", "--config", str(MLP), *local(in_tmp), "--data.val_size", "100", "--ckpt_path", str(ckpt), *extra]
    code, _, err = run_main([*args, "--output_dir", str(in_tmp / "rot")], capsys)
    assert code == 2 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert line.startswith(f"error: {message}"), line


@pytest.mark.parametrize("route", ["argv", "trainer_file"])
def test_an_integer_batch_count_stays_a_count(route: str, in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    """Lightning types limit_*_batches ``float | int``: here a written 1 is one batch, not 100 % (1.0)."""
    from dropout_lab.cli import DropoutLabCLI

    (in_tmp / "limits.yaml").write_text("trainer:\n  limit_test_batches: 1\n  limit_predict_batches: 1.0\n")
    (in_tmp / "trainer.yaml").write_text("limit_val_batches: 1\n")
    val = ["--trainer.limit_val_batches", "1"] if route == "argv" else ["--trainer", str(in_tmp / "trainer.yaml")]
    args = ["fit", "--config", str(MLP), *local(in_tmp), "--config", str(in_tmp / "limits.yaml"), *val,
            "--data.val_size", "100", "--data.batch_size", "32", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    cli = DropoutLabCLI(args=args)
    trainer = cli.trainer
    assert (trainer.limit_val_batches, trainer.limit_test_batches, trainer.val_check_interval) == (1, 1, 2)
    assert [type(v) for v in (trainer.limit_val_batches, trainer.limit_test_batches)] == [int, int]
    assert trainer.limit_predict_batches == 1.0 and isinstance(trainer.limit_predict_batches, float)  # written 1.0
    assert trainer.num_val_batches == [1] and trainer.num_test_batches == [1]
    (run,) = (in_tmp / "logs").glob("*/version_*")
    saved = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert saved["limit_val_batches"] == 1 and isinstance(saved["limit_val_batches"], int)  # a rerun gets 1 too


def test_batch_counts_stay_integers_after_a_plain_trainer_was_parsed() -> None:
    """A Union equals its reordering, so a parser's cache once gave LabTrainer Lightning's float-first type after
    any plain ``Trainer`` parser (the ``co2`` command's) had been built in the same process."""
    import lightning as L
    from jsonargparse import ArgumentParser

    from dropout_lab.trainer import LabTrainer

    ArgumentParser().add_class_arguments(L.Trainer, "trainer")
    parser = ArgumentParser()
    parser.add_class_arguments(LabTrainer, "trainer")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
        parsed = parser.parse_args([f"--trainer.{key}", "1"]).trainer[key]
        assert parsed == 1 and type(parsed) is int, (key, parsed)
        assert parser.parse_args([f"--trainer.{key}", "0.5"]).trainer[key] == 0.5


def test_subcommand_usage_names_the_subcommand(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    for subcommand in ("fit", "mc"):
        code, out, _ = run_main([subcommand, "--help"], capsys)
        assert code in (0, None)
        assert re.match(rf"usage: .*\[options\] {subcommand} \[-c CONFIG\]", out), out.splitlines()[0]


def test_help_lists_every_program_and_whole_subcommand_lines(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_main(["--help"], capsys)
    assert code in (0, None)
    text = " ".join(out.split())
    assert "Two more programs share this entry point: `study`" in text and "and `co2`" in text, text
    listing = " ".join(out.split("Available subcommands:")[1].split())
    for line in (
        "test One evaluation epoch over the test split, with the weights of --ckpt_path.",
        "fit Train (resume with --ckpt_path), then test the best checkpoint (--test_after_fit false to skip).",
    ):
        assert line in listing, listing
