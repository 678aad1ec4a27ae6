"""Crash safety and reproducibility: exact resume after SIGKILL, Ctrl-C, DDP on CPU, divergence, provenance.

The runs are real ``python -m dropout_lab`` subprocesses on the synthetic set (see ``test_cli.py``).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from test_cli import MLP, cli_env, error_lines, explain, local, run_cli, run_main, scalars
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dropout_lab.reliability import (
    DivergenceError,
    DivergenceGuard,
    LastEveryEpochCheckpoint,
    rng_state,
    set_rng_state,
)

PAUSE_AT = '''
import time
from pathlib import Path
from lightning.pytorch.callbacks import Callback


class PauseAt(Callback):
    """Touch ``marker`` after batch ``batch`` of epoch ``epoch`` of a fresh (not resumed) run, then wait.

    Args:
        marker: the file to create.
        epoch: 0-based epoch.
        batch: batch index in that epoch.
    """

    def __init__(self, marker: str, epoch: int = 2, batch: int = 3) -> None:
        self.marker, self.epoch, self.batch = marker, epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.ckpt_path is None and (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            Path(self.marker).touch()
            time.sleep(300)
'''


def six_epochs(workdir: Path, *extra: str) -> list[str]:
    """Six short epochs (8 batches of 64) on the synthetic set, no test at the end."""
    return ["fit", "--config", str(MLP), *local(workdir), "--data.val_size", "100", "--data.batch_size", "64",
            "--trainer.max_epochs", "6", "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
            *extra]  # fmt: skip


def final(run_dir: Path, tag: str) -> float:
    """The value of ``tag`` at the run's last step (a resumed run repeats some steps; the last write counts)."""
    points = scalars(run_dir)[tag]
    last_step = max(step for step, _ in points)
    return [value for step, value in points if step == last_step][-1]


def start(args: list[str], workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dropout_lab", *args]
    return subprocess.Popen(
        cmd,
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,  # a run started under `cmd &` inherits SIGINT ignored, and Ctrl-C would do nothing
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before {path.name} appeared:\n{process.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path.name} did not appear in {timeout} s")
        time.sleep(0.1)


@pytest.fixture
def pause_env(tmp_path: Path, shared_gz_dir: Path) -> dict[str, str]:
    """The CLI environment with a ``killpoint.PauseAt`` callback importable."""
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "killpoint.py").write_text(PAUSE_AT)
    env = cli_env(shared_gz_dir)
    env["PYTHONPATH"] = f"{helpers}:{env['PYTHONPATH']}"
    return env


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path, pause_env: dict[str, str]) -> None:
    reference = start(six_epochs(tmp_path / "a"), tmp_path / "a", pause_env)
    marker = tmp_path / "paused"
    pause = ["--trainer.callbacks+=killpoint.PauseAt", "--trainer.callbacks.marker", str(marker)]
    victim = start(six_epochs(tmp_path / "b", *pause), tmp_path / "b", pause_env)
    wait_for(marker, victim)  # epoch 3 of 6, batch 4 of 8
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert reference.wait(timeout=300) == 0, reference.stdout.read()[-4000:]
    (run_b,) = (tmp_path / "b" / "logs").glob("*/version_*")
    assert torch.load(run_b / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # the last full epoch

    # resume from the run folder alone: its saved config and ``--ckpt_path last``
    resumed = start(["fit", "--config", str(run_b / "config.yaml"), "--ckpt_path", "last"], tmp_path / "b", pause_env)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-4000:]
    (run_a,) = (tmp_path / "a" / "logs").glob("*/version_*")
    assert [p.name for p in (tmp_path / "b" / "logs").glob("*/version_*")] == [run_b.name]  # same TensorBoard run
    for tag in ("val/acc", "val/loss"):
        assert final(run_b, tag) == pytest.approx(final(run_a, tag), abs=1e-6), tag
    a = torch.load(run_a / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run_b / "checkpoints" / "last.ckpt", weights_only=True)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (5, 48)
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)


def test_ctrl_c_leaves_a_usable_last_checkpoint(tmp_path: Path, pause_env: dict[str, str]) -> None:
    marker = tmp_path / "paused"
    pause = ["--trainer.callbacks+=killpoint.PauseAt", "--trainer.callbacks.marker", str(marker)]
    run = start(six_epochs(tmp_path, *pause), tmp_path, pause_env)
    wait_for(marker, run)
    run.send_signal(signal.SIGINT)
    out = run.communicate(timeout=120)[0]
    assert run.returncode != 0 and "Traceback" not in out, out[-4000:]
    (folder,) = (tmp_path / "logs").glob("*/version_*")
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 16
    assert "RNGStateCheckpoint" in ckpt["callbacks"] and ckpt["optimizer_states"]


def test_ddp_on_two_cpu_processes(tmp_path: Path, shared_gz_dir: Path) -> None:
    args = ["fit", "--config", str(MLP), *local(tmp_path), "--data.val_size", "100", "--data.batch_size", "64",
            "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.strategy", "ddp", "--trainer.devices", "2"]  # fmt: skip
    result = run_cli(args, tmp_path, shared_gz_dir)
    assert result.returncode == 0, explain(result)
    (folder,) = (tmp_path / "logs").glob("*/version_*")  # one TensorBoard run
    names = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert len(names) == 2 and "last.ckpt" in names, names  # one best + one last, not one per rank
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 * math.ceil(250 / 64)  # each rank trained on its half of the 500 images

    # the synced test accuracy of the DDP run equals a single-process test of the same checkpoint
    ddp_acc = final(folder, "test/acc")
    best = next(p for p in (folder / "checkpoints").iterdir() if p.name != "last.ckpt")
    single = run_cli(["test", "--config", str(folder / "config.yaml"), "--ckpt_path", str(best),
                      "--trainer.strategy", "auto", "--trainer.devices", "1", "--trainer.logger", "false"],
                     tmp_path, shared_gz_dir)  # fmt: skip
    assert single.returncode == 0, explain(single)
    found = [line.split()[-1] for line in single.stdout.splitlines() if "test/acc" in line]
    assert found and float(found[-1]) == pytest.approx(ddp_acc, abs=1e-6), single.stdout


SAVE_WEIGHTS = '''
import torch
from lightning.pytorch.callbacks import Callback


class SaveWeights(Callback):
    """Save each rank's weights after fit as ``<folder>/rank<r>.pt``.

    Args:
        folder: where to write.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(pl_module.state_dict(), f"{self.folder}/rank{trainer.global_rank}.pt")
'''


def test_ddp_with_micro_batches_keeps_the_ranks_equal(tmp_path: Path, shared_gz_dir: Path) -> None:
    """Every micro-batch's backward all-reduces the gradients: both ranks make the same 4 updates per batch.

    Without the all-reduce the two ranks, which train on different halves of the data, would drift apart.
    """
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "rankdump.py").write_text(SAVE_WEIGHTS)
    env = cli_env(shared_gz_dir)
    env["PYTHONPATH"] = f"{helpers}:{env['PYTHONPATH']}"
    args = ["fit", "--config", str(MLP), *local(tmp_path), "--data.val_size", "100", "--data.batch_size", "64",
            "--model.init_args.micro_batch_size", "16", "--trainer.max_epochs", "2",
            "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
            "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.callbacks+=rankdump.SaveWeights", "--trainer.callbacks.folder", str(tmp_path)]  # fmt: skip
    run = start(args, tmp_path, env)
    out = run.communicate(timeout=300)[0]
    assert run.returncode == 0, out[-4000:]
    (folder,) = (tmp_path / "logs").glob("*/version_*")
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 * 4 * math.ceil(250 / 64)  # 4 micro-batch updates per batch of each half
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, value in ranks[0].items():  # the two halves differ (test_data's shard tests), the weights do not
        assert torch.equal(value, ranks[1][key]), key
        assert torch.equal(value, ckpt["state_dict"][key]), key


# --- in process -----------------------------------------------------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_gz_dir: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(shared_gz_dir))
    return tmp_path


def test_divergence_stops_with_the_step_and_no_bad_checkpoint(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    args = six_epochs(in_tmp, "--model.optimizer.init_args.lr", "1e4")
    code, _, err = run_main(args, capsys)
    assert code == 3, err
    (line,) = error_lines(err)
    assert "training diverged" in line and "at step" in line and "learning rate" in line, line
    assert "Traceback" not in err
    for path in in_tmp.glob("logs/*/version_*/checkpoints/*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path


def test_guard_names_the_first_bad_step() -> None:
    class Trainer:
        global_step = 0
        current_epoch = 0
        num_training_batches = 10
        _logger_connector = type("C", (), {"should_update_logs": False})()

    guard, trainer = DivergenceGuard(), Trainer()
    for step, loss in enumerate([1.0, 2.0, float("nan"), 1.0, float("inf")]):
        trainer.global_step = step + 1
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="at step 2 "):
        guard.check(trainer)  # type: ignore[arg-type]


class _Regression(L.LightningModule):
    """A linear least-squares model whose loss is infinite on the step(s) ``bad_steps``."""

    def __init__(self, bad_steps: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.lin, self.bad_steps = nn.Linear(4, 1), bad_steps

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = (self.lin(batch[0]) - batch[1]).pow(2).mean()
        return loss * math.inf if self.global_step in self.bad_steps else loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", (self.lin(batch[0]) - batch[1]).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_small(root: Path, model: L.LightningModule, n: int, callbacks: list, **trainer_args: object) -> L.Trainer:
    data = TensorDataset(torch.randn(n, 4, generator=torch.Generator().manual_seed(0)), torch.randn(n, 1))
    trainer = L.Trainer(default_root_dir=root, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, **trainer_args)  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    return trainer


def test_guard_checks_before_a_validation_inside_the_epoch(tmp_path: Path) -> None:
    """A loss that turned inf off a log step is caught before a mid-epoch validation could checkpoint it."""
    checkpoint = LastEveryEpochCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1, save_last=True)
    with pytest.raises(DivergenceError, match="at step 0 "):
        _fit_small(tmp_path, _Regression(bad_steps=(0,)), 16, [DivergenceGuard(), checkpoint], max_epochs=1,
                   val_check_interval=0.5, log_every_n_steps=50)  # fmt: skip
    assert list(tmp_path.glob("*.ckpt")) == []


@pytest.mark.parametrize(
    "schedule", [{"val_check_interval": 0.3}, {"val_check_interval": 3, "check_val_every_n_epoch": None}]
)
def test_last_checkpoint_holds_each_epochs_last_step_when_validation_is_inside_the_epoch(
    tmp_path: Path, schedule: dict
) -> None:
    """10 batches an epoch, validation after batches 3, 6, 9 only: ``last.ckpt`` still gets the epoch's end."""
    checkpoint = LastEveryEpochCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1, save_last=True)
    trainer = _fit_small(tmp_path, _Regression(), 40, [checkpoint], max_epochs=2, **schedule)
    assert trainer.global_step == 20
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 20


def test_rng_state_round_trip() -> None:
    import random

    import numpy as np

    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_drawn_seed_and_provenance_are_saved(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    from dropout_lab.cli import main

    main([*six_epochs(in_tmp, "--seed_everything", "true", "--trainer.max_epochs", "1")])
    (folder,) = (in_tmp / "logs").glob("*/version_*")
    text = (folder / "config.yaml").read_text()
    seed = yaml.safe_load(text)["seed_everything"]
    assert isinstance(seed, int) and not isinstance(seed, bool)
    assert os.environ["PL_GLOBAL_SEED"] == str(seed)  # the seed saved is the seed used
    assert "--ckpt_path" in text.splitlines()[2]  # the resume command in the header
    info = yaml.safe_load((folder / "provenance.yaml").read_text())
    assert info["torch"] == str(torch.__version__) and {"lightning", "deterministic_algorithms"} <= set(info)
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)  # tensors and plain types only
    assert ckpt["hyper_parameters"]["dropouts"] == [0.5, 0.5]


def test_random_seed_refused_under_an_external_launcher(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "8")  # as torchrun sets it; each process would draw its own seed
    code, _, err = run_main(six_epochs(in_tmp, "--seed_everything", "true"), capsys)
    assert code == 2, err
    (line,) = error_lines(err)
    assert line.startswith("error: seed_everything") and "integer seed" in line
    assert not (in_tmp / "logs").exists()


def test_testing_a_run_leaves_its_folder_alone(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    from dropout_lab.cli import main

    main([*six_epochs(in_tmp, "--trainer.max_epochs", "1")])
    (folder,) = (in_tmp / "logs").glob("*/version_*")
    saved = (folder / "config.yaml").read_text()
    main(["test", "--config", str(folder / "config.yaml"), "--ckpt_path", str(folder / "checkpoints" / "last.ckpt")])
    assert (folder / "config.yaml").read_text() == saved  # the fit's config, not the test's
    assert len(list((in_tmp / "logs").glob("*/version_*"))) == 2  # the test logged to a folder of its own
