"""MC-dropout regression on CO2: the data module (statsmodels' real series), the regressor, MC moments, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("statsmodels")
pytest.importorskip("sklearn")

import lightning as L

from dropout_lab.cli import main
from dropout_lab.dropout import StochasticModule
from dropout_lab.regression import CO2DataModule, MCDropoutRegressor, load_co2, mc_moments

REPO = Path(__file__).resolve().parents[1]
RELU, TANH = REPO / "configs" / "co2_relu.yaml", REPO / "configs" / "co2_tanh.yaml"


@pytest.fixture(scope="module")
def co2() -> CO2DataModule:
    dm = CO2DataModule(holdout_years=10)
    dm.setup()
    return dm


def test_missing_weeks_are_dropped() -> None:
    t, y = load_co2()
    assert len(t) == len(y) == 2284 - 59  # 2284 weeks, 59 without a measurement
    assert np.isfinite(y).all() and (np.diff(t) > 0).all()
    assert 1958 < t[0] < 1959 and 2001 < t[-1] < 2002


def test_split_in_time(co2: CO2DataModule) -> None:
    (t_train, _), (t_test, _) = co2.raw["train"], co2.raw["test"]
    assert len(t_train) + len(t_test) == 2284 - 59
    assert t_train.max() < co2.cutoff <= t_test.min()
    assert 9.9 < t_test.max() - t_test.min() <= 10.0
    shorter = CO2DataModule(holdout_years=5)
    shorter.setup()
    assert len(shorter.raw["test"][0]) < len(t_test) / 1.8


def test_scaling_uses_training_statistics_only(co2: CO2DataModule) -> None:
    x, y = co2.splits["train"]
    for v in (x, y):
        assert abs(v.double().mean().item()) < 1e-5
        assert abs(v.double().std(correction=0).item() - 1) < 1e-5
    x_test, y_test = co2.splits["test"]
    assert x_test.min() > x.max()  # the held-out years lie beyond the training range
    assert y_test.mean() > 2  # not re-standardized: CO2 kept rising
    t_test, raw_y = co2.raw["test"]
    np.testing.assert_allclose(y_test.double().numpy().ravel() * co2.y_std + co2.y_mean, raw_y, atol=1e-3)
    np.testing.assert_allclose(x_test.numpy().ravel(), (t_test - co2.t_mean) / co2.t_std, atol=1e-5)


def test_loaders_and_bad_holdout(co2: CO2DataModule) -> None:
    x, y = next(iter(co2.train_dataloader()))
    assert x.shape == y.shape == (128, 1)
    x, _ = next(iter(co2.val_dataloader()))
    assert x.shape == co2.splits["test"][0].shape
    with pytest.raises(ValueError, match="holdout_years"):
        CO2DataModule(holdout_years=100).setup()


def test_forward_and_mc_shapes() -> None:
    torch.manual_seed(0)
    model = MCDropoutRegressor(hidden_size=16, num_layers=3, dropout=0.2)
    assert sum(isinstance(m, StochasticModule) for m in model.modules()) == 3
    x = torch.linspace(-1, 1, 7).reshape(-1, 1)
    assert model(x).shape == (7, 1)
    model.train()
    mean, var = mc_moments(model, x, T=50)
    assert mean.shape == var.shape == (7,) and (var > 0).all()
    assert model.training and not any(m.mc for m in model.modules() if isinstance(m, StochasticModule))
    sliced_mean, _ = mc_moments(model, x, T=2000, chunk_size=3)  # fewer rows than inputs: slices of a pass
    batched_mean, _ = mc_moments(model, x, T=2000)
    torch.testing.assert_close(sliced_mean, batched_mean, atol=0.02, rtol=0)
    moments = []
    for share in (True, False):  # all 7 x 40 rows in one forward: the same draws with and without prefix sharing
        torch.manual_seed(0)
        moments.append(mc_moments(model, x, T=40, chunk_size=280, share_prefix=share))
    torch.testing.assert_close(moments[0], moments[1], rtol=1e-5, atol=1e-6)
    out = model.predict_step((x, torch.zeros(7, 1)), 0)  # what `co2 predict` returns per batch
    assert out["mean"].shape == out["var"].shape == out["target"].shape == (7,)


def test_dropconnect_passes_in_one_forward_get_their_own_masks() -> None:
    """mc_moments runs many passes per forward: a DropConnect layer must draw one weight mask per row there."""
    from dropout_lab.dropconnect import DropConnectLinear

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), DropConnectLinear(16, 16, p=0.5),
                              torch.nn.ReLU(), torch.nn.Linear(16, 1))  # fmt: skip
    x = torch.linspace(-1, 1, 3).reshape(-1, 1)
    for share in (True, False):
        _, var = mc_moments(net, x, T=64, share_prefix=share)  # all 3 x 64 rows in one forward
        assert (var > 1e-6).all(), var
    assert not net[2].per_sample  # restored


def test_no_dropout_means_no_spread() -> None:
    model = MCDropoutRegressor(activation="tanh", hidden_size=8, num_layers=2, dropout=0.0).eval()
    x = torch.randn(5, 1)
    mean, var = mc_moments(model, x, T=4)
    torch.testing.assert_close(mean, model(x).squeeze(1))
    assert (var < 1e-10).all()


@pytest.mark.parametrize(("kwargs", "match"), [({"activation": "sigmoid"}, "activation"), ({"dropout": 1.0}, "p")])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MCDropoutRegressor(**kwargs)


def test_mc_std_grows_away_from_the_training_points() -> None:
    """ReLU dropout net fitted on [-1, 1]: its MC std at x in [5, 6] is over twice the std inside.

    Seeds 0, 1, 2 give ratios 3.7, 2.9, 3.5 (2.3, 1.8, 2.2 at x in [3, 4]); seed 0 is used.
    """
    L.seed_everything(0, verbose=False)
    x = torch.rand(256, 1) * 2 - 1
    y = torch.sin(3 * x) + 0.1 * torch.randn_like(x)
    model = MCDropoutRegressor(hidden_size=128, num_layers=3, dropout=0.2)
    trainer = L.Trainer(
        max_steps=300,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))
    inside = mc_moments(model, torch.linspace(-1, 1, 50).reshape(-1, 1), T=200)[1].sqrt().mean()
    far = mc_moments(model, torch.linspace(5, 6, 50).reshape(-1, 1), T=200)[1].sqrt().mean()
    assert far > 2 * inside, (far, inside)


# ---------------------------------------------------------------------------------------------- the CLI
def _local(tmp_path: Path) -> list[str]:
    return [
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--trainer.default_root_dir",
        str(tmp_path),
    ]


def test_fit_fast_dev_run(tmp_path: Path) -> None:
    main(["co2", "fit", "--config", str(RELU), "--trainer.fast_dev_run", "true", *_local(tmp_path)])


@pytest.mark.parametrize(
    ("option", "value", "key"),
    [("--model.dropout", "1.5", "model.dropout"), ("--model.activation", "sigmoid", "model.activation")],
)
def test_bad_value_is_one_error_line(tmp_path: Path, capsys, option: str, value: str, key: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["co2", "fit", "--config", str(RELU), option, value, *_local(tmp_path)])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], lines


def test_report_help_documents_every_argument(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["co2", "report", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for arg in ("--relu", "--tanh", "--samples", "--out", "--gp_every", "--gp_restarts", "--seed"):
        assert arg in text
    assert "checkpoint of the ReLU net" in text and "MC-dropout passes" in text


def test_report_missing_checkpoint(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["co2", "report", "--relu", str(tmp_path / "no.ckpt"), "--tanh", str(tmp_path / "no.ckpt")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error:")


def test_report_end_to_end(tmp_path: Path, capsys) -> None:
    """ReLU from a checkpoint, Tanh from a config that the report trains first."""
    tiny_args = ["--trainer.max_steps", "3", "--model.hidden_size", "8", "--model.num_layers", "2"]
    main(["co2", "fit", "--config", str(RELU), *tiny_args, *_local(tmp_path)])
    relu = tmp_path / "logs" / "co2_relu" / "version_0" / "checkpoints" / "last.ckpt"
    config = yaml.safe_load(TANH.read_text())
    config["model"].update(hidden_size=8, num_layers=2)
    config["trainer"].update(max_steps=3, accelerator="cpu", enable_progress_bar=False, default_root_dir=str(tmp_path))
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    tanh = tmp_path / "tiny_tanh.yaml"
    tanh.write_text(yaml.safe_dump(config))
    out = tmp_path / "report"
    args = ["--relu", str(relu), "--tanh", str(tanh), "--samples", "5", "--gp_every", "40", "--out", str(out)]
    main(["co2", "report", *args])
    assert {p.name for p in out.iterdir()} == {"co2.png", "co2.md", "co2.json"}
    table = (out / "co2.md").read_text()
    for name in ("ReLU", "Tanh", "GP"):
        assert f"| {name} |" in table
    printed = capsys.readouterr().out
    assert "RMSE held-out (ppm)" in printed
    assert "ReLU: 5 MC passes over" in printed and "GP: fitting on" in printed  # a line before each long step
    tanh_ckpt = tmp_path / "logs" / "co2_tanh" / "version_0" / "checkpoints" / "last.ckpt"
    assert tanh_ckpt.is_file()
    # checkpoints swapped, of another model, or no checkpoint at all: one error line each, nothing written
    fashion, notes = tmp_path / "fashion.ckpt", tmp_path / "notes.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"dropouts": [0.5]}}, fashion)
    notes.write_text("notes\n")
    wrong = {
        (str(tanh_ckpt), str(relu)): f"relu: {tanh_ckpt} holds a tanh net, not a relu one",
        (str(relu), str(fashion)): f"tanh: {fashion} is not a checkpoint of the CO2 regressor",
        (str(notes), str(relu)): f"relu: {notes} is not a readable checkpoint",
        (str(relu), str(RELU)): f"tanh: {RELU} trains a relu net, not a tanh one",  # refused before any training
        (str(tanh), str(relu)): f"relu: {tanh} trains a tanh net, not a relu one",
    }
    for (relu_arg, tanh_arg), message in wrong.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["co2", "report", "--relu", relu_arg, "--tanh", tanh_arg, "--out", str(tmp_path / "wrong")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: {message}") and "Traceback" not in err, err
    assert not (tmp_path / "wrong").exists()
    assert [p.name for p in (tmp_path / "logs" / "co2_tanh").iterdir()] == ["version_0"]  # no second training


def test_missing_extra_is_one_error_line(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "statsmodels" else real_find_spec(name, *a)
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["co2", "fit", "--config", str(RELU), "--trainer.fast_dev_run", "true", *_local(tmp_path)])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install -e '.[regression]'" in lines[0], lines
