"""Every config in configs/ runs `fit` (then `test`) with fast_dev_run on synthetic data, through the CLI.

The YAML files are discovered, so a new config is smoke-tested without editing this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import synthetic_cli_args

from dropout_lab.cli import DropoutLabCLI
from dropout_lab.models import ClassifierModule

ROOT = Path(__file__).resolve().parents[1]
# the CO2 regression configs run through `python -m dropout_lab co2` (tests/test_regression.py smoke-tests them)
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.stem.startswith("co2_"))


def test_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"mlp", "mlp_scratch", "mlp_dropconnect", "mlp_stochastic", "mlp_gaussian", "mlp_hinton", "lenet"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_fast_dev_run(config: Path, gz_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_MNIST_DIR", str(gz_dir))
    monkeypatch.chdir(tmp_path)
    cli = DropoutLabCLI(args=["fit", *synthetic_cli_args(config, tmp_path), "--trainer.fast_dev_run", "true"])
    assert isinstance(cli.model, ClassifierModule)
    assert cli.trainer.state.finished
    # fit ran one training batch and, through --test_after_fit (default true), one test batch
    assert "test/acc" in cli.trainer.callback_metrics
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1.0
