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
