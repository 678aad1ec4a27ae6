"""The `mc` and `rotated` subcommands end to end (in process) on synthetic data, from a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import synthetic_cli_args

from dropout_lab.cli import DropoutLabCLI

ROOT = Path(__file__).resolve().parents[1]


def _common(tmp_path: Path) -> list[str]:
    return synthetic_cli_args(ROOT / "configs/mlp.yaml", tmp_path)


@pytest.fixture
def checkpoint(gz_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FASHION_MNIST_DIR", str(gz_dir))
    monkeypatch.chdir(tmp_path)
    DropoutLabCLI(args=["fit", *_common(tmp_path), "--trainer.max_epochs", "1", "--test_after_fit", "false"])
    (ckpt,) = (tmp_path / "logs").glob("mlp/version_0/checkpoints/last.ckpt")
    return ckpt


def test_mc_subcommand(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "mc"
    args = ["mc", *_common(tmp_path), "--ckpt_path", str(checkpoint), "--samples", "8", "--output_dir", str(out_dir)]
    args += ["--curve_repeats", "2"]
    cli = DropoutLabCLI(args=args)
    printed = capsys.readouterr().out
    assert "MC dropout, T=8" in printed and "deterministic (weight scaling)" in printed
    saved = torch.load(out_dir / "mc_predictions.pt", weights_only=True)
    n_test = 100  # the synthetic test split written by the gz_dir fixture
    assert saved["mc_probs"].shape == saved["probs"].shape == (n_test, 10)
    assert torch.allclose(saved["mc_probs"].sum(-1), torch.ones(n_test, dtype=saved["mc_probs"].dtype), atol=1e-5)
    assert (saved["mutual_information"] >= 0).all()
    assert (saved["mutual_information"] <= saved["entropy"] + 1e-6).all()
    assert (out_dir / "reliability.png").stat().st_size > 0
    assert (out_dir / "mc_vs_T.png").stat().st_size > 0
    curve = (out_dir / "mc_vs_T.md").read_text()
    assert "T=1 " in curve and "T=8 " in curve and "accuracy_se" in curve
    assert cli.model.mc_samples == 0  # switched off again after the command


def test_rotated_subcommand(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "rot"
    args = [
        "rotated",
        *_common(tmp_path),
        "--ckpt_path",
        str(checkpoint),
        "--samples",
        "10",
        "--output_dir",
        str(out_dir),
    ]
    DropoutLabCLI(args=args)
    table = (out_dir / "rotated.md").read_text()
    assert table.count("\n| ") >= 12  # one row per angle
    assert (out_dir / "rotated.png").stat().st_size > 0
    assert "predictive entropy" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["mc", "rotated"])
def test_share_prefix_false_runs_whole_passes(
    command: str, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--share_prefix false`` reaches every MC call of the command (``mc``: its predictions and T curve)."""
    from dropout_lab import mc_passes

    def no_sharing(*args: object) -> None:
        raise AssertionError("share_prefix false should not look for a prefix to share")

    monkeypatch.setattr(mc_passes, "first_noise_layer", no_sharing)
    args = [command, *_common(tmp_path), "--ckpt_path", str(checkpoint), "--samples", "4", "--share_prefix", "false"]
    args += ["--output_dir", str(tmp_path / command)] + (["--curve_repeats", "2"] if command == "mc" else [])
    DropoutLabCLI(args=args)
    assert any((tmp_path / command).iterdir())
    monkeypatch.undo()  # and the default does look for one
    calls: list[int] = []
    monkeypatch.setattr(mc_passes, "first_noise_layer", lambda *a: calls.append(1) or None)
    DropoutLabCLI(args=["true" if a == "false" else a for a in args])
    assert calls


@pytest.mark.parametrize(
    ("precision", "dtype", "autocast"),
    [("bf16-true", torch.bfloat16, False), ("64-true", torch.float64, False), ("bf16-mixed", torch.float32, True)],
)
def test_mc_curve_and_rotated_run_under_the_trainer_precision(
    precision: str, dtype: torch.dtype, autocast: bool, checkpoint: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The T curve and the rotated experiment run their MC passes as ``predict`` does: cast weights, autocast.

    ``mc --curve_repeats`` once fed float32 images to a bf16-true or 64-true net (a dtype error), and ``rotated``
    ran every precision in float32 without autocast.
    """
    from dropout_lab import trainer

    seen: dict[str, tuple[torch.dtype, bool]] = {}

    def spy(name: str, run):
        def wrapped(model, *args, **kwargs):
            seen[name] = (next(model.parameters()).dtype, torch.is_autocast_enabled("cpu"))
            return run(model, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(trainer, "summaries_vs_T", spy("curve", trainer.summaries_vs_T))
    monkeypatch.setattr(trainer, "rotated_image_experiment", spy("rotated", trainer.rotated_image_experiment))
    common = [*_common(tmp_path), "--ckpt_path", str(checkpoint), "--trainer.precision", precision, "--samples", "4"]
    DropoutLabCLI(args=["mc", *common, "--curve_repeats", "2", "--output_dir", str(tmp_path / "mc")])
    DropoutLabCLI(args=["rotated", *common, "--output_dir", str(tmp_path / "rot")])
    assert seen == {"curve": (dtype, autocast), "rotated": (dtype, autocast)}
    assert "T=4 " in (tmp_path / "mc" / "mc_vs_T.md").read_text()
    assert (tmp_path / "rot" / "rotated.md").read_text().count("\n| ") >= 12
    saved = torch.load(tmp_path / "mc" / "mc_predictions.pt", weights_only=True)
    assert saved["mc_probs"].dtype == torch.promote_types(dtype, torch.float32)  # summaries: at least float32


def test_a_checkpoint_of_another_model_is_named(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """Lightning rebuilds the checkpoint's model (an MLP) where the config names LeNet: the run says so."""
    args = ["mc", *synthetic_cli_args(ROOT / "configs/lenet.yaml", tmp_path), "--ckpt_path", str(checkpoint)]
    cli = DropoutLabCLI(args=[*args, "--samples", "2", "--output_dir", str(tmp_path / "mc")])
    assert type(cli.model).__name__ == "DropoutMLP"
    err = capsys.readouterr().err
    assert f"note: --ckpt_path {checkpoint} holds a DropoutMLP; it is used instead of the config's LeNet" in err, err
    DropoutLabCLI(args=["mc", *_common(tmp_path), "--ckpt_path", str(checkpoint), "--samples", "2",
                        "--output_dir", str(tmp_path / "mc")])  # fmt: skip
    assert "note:" not in capsys.readouterr().err  # the same class: nothing to say
