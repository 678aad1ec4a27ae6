"""``python -m dropout_lab co2 …``: train the CO2 MC-dropout regressor, and compare ReLU, Tanh and a GP.

``co2 fit --config configs/co2_relu.yaml`` (and validate/test/predict) is LightningCLI with the model
:class:`~dropout_lab.regression.MCDropoutRegressor` and the data :class:`~dropout_lab.regression.CO2DataModule`;
``co2 report --relu A --tanh B`` (A, B: checkpoints, or configs to train first) writes the figure and table.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dropout_lab.cli import ConfigError, read_checkpoint
from dropout_lab.cli_text import condense_error
from dropout_lab.regression import CO2DataModule, MCDropoutRegressor, MissingExtraError, mc_moments, require
from dropout_lab.trainer import markdown_table

__all__ = ["CO2CLI", "main", "report"]

PROG = "python -m dropout_lab co2"
DESCRIPTION = (
    "MC-dropout regression on the Mauna Loa CO2 series (needs pip install -e '.[regression]'). "
    "`fit --config configs/co2_relu.yaml` trains (TensorBoard logs under lightning_logs/); "
    "`report --relu CKPT_OR_CONFIG --tanh CKPT_OR_CONFIG` compares both nets with a Gaussian process on the "
    "held-out years and writes a figure and a markdown table (`report --help`)."
)


class CO2CLI(LightningCLI):
    """LightningCLI for the CO2 regressor: fixed model and data classes, seed 0, the last checkpoint kept.

    Args:
        args: arguments to parse instead of ``sys.argv`` (list of strings or a dict).
        run: run the subcommand (false = only instantiate the classes).
        **kwargs: passed on to :class:`~lightning.pytorch.cli.LightningCLI`.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION, "exit_on_error": False, "prog": PROG})
        super().__init__(
            model_class=MCDropoutRegressor,
            datamodule_class=CO2DataModule,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``checkpoint.*`` configures the checkpoints: by default only the last one (no selection)."""
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "{step}"})

    def instantiate_classes(self) -> None:
        """Instantiate, turning a constructor's ``ValueError``/``TypeError`` into a one-line config error."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err)) from None


def _check_source(source: str, activation: str) -> None:
    """Fail before any training if ``source`` is missing, or is a config of another activation than ``activation``."""
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{activation}: {source}: no such file; pass a checkpoint (.ckpt) or a config (.yaml)")
    if path.suffix in (".yaml", ".yml"):
        try:
            model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        except (OSError, yaml.YAMLError, AttributeError) as err:
            raise ConfigError(f"{activation}: {source}: not a readable config ({type(err).__name__})") from None
        given = model.get("activation", "relu") if isinstance(model, dict) else None  # the regressor's default
        if given != activation:
            raise ConfigError(f"{activation}: {source} trains a {given} net, not a {activation} one")


def _checkpoint(source: str) -> str:
    """``source`` itself if it is a checkpoint; if it is a YAML config, train it and return the last checkpoint."""
    path = Path(source)
    if path.suffix not in (".yaml", ".yml"):
        return source
    cli = CO2CLI(args=["fit", "--config", source])
    callback = cli.trainer.checkpoint_callback
    if not isinstance(callback, ModelCheckpoint) or not callback.last_model_path:
        raise ConfigError(f"{source}: the run saved no checkpoint; keep checkpoint.save_last true")
    return callback.last_model_path


def report(
    relu: str,
    tanh: str,
    samples: PositiveInt = 200,
    out: str = "results/co2",
    gp_every: PositiveInt = 1,
    gp_restarts: NonNegativeInt = 0,
    seed: int = 0,
    share_prefix: bool = True,
) -> dict[str, dict[str, float]]:
    """ReLU vs Tanh MC dropout vs a Gaussian process on the held-out years of the CO2 series.

    Writes ``co2.png`` (data, mean ± 2 std of each model, the train/extrapolation boundary), ``co2.md``
    (RMSE and mean Gaussian NLL on the held-out years in ppm, mean predictive std on the training years and on
    the held-out years) and ``co2.json`` into ``out``, and prints the table. The nets' predictive variance is
    the variance of the T passes plus a homoscedastic noise variance, the mean squared residual of their MC
    mean on the training years; the "model std" columns leave the noise out (for the GP: its WhiteKernel).

    Args:
        relu: checkpoint of the ReLU net, or a config (``configs/co2_relu.yaml``) to train first.
        tanh: checkpoint of the Tanh net, or a config (``configs/co2_tanh.yaml``) to train first.
        samples: MC-dropout passes T per time point (1000 on a GPU; 200 is plenty on a CPU).
        out: folder for the figure and the tables.
        gp_every: fit the GP on every n-th training week (1 = all; larger is faster, for quick checks).
        gp_restarts: extra random restarts of the GP's hyperparameter optimizer.
        seed: seed of the MC passes and of the GP optimizer's restarts.
        share_prefix: run the first hidden layer once per week, not once per pass (faster; the same
            distribution); false = the MC draws of the versions before this option.
    """
    _check_source(relu, "relu")
    _check_source(tanh, "tanh")  # both before either config is trained
    nets = {"ReLU": _checkpoint(relu), "Tanh": _checkpoint(tanh)}
    dm = _data_of(nets)  # checks the checkpoints before anything is written
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (t_train, y_train), (t_test, y_test) = dm.raw["train"], dm.raw["test"]
    t_all = np.concatenate([t_train, t_test])
    x_all = torch.cat([dm.splits["train"][0], dm.splits["test"][0]])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preds, seconds = {}, {}
    for name, ckpt in nets.items():
        print(f"{name}: {samples} MC passes over {len(x_all)} weeks on the {device} ({ckpt})", flush=True)
        start = time.perf_counter()
        model = MCDropoutRegressor.load_from_checkpoint(ckpt, map_location=device)
        torch.manual_seed(seed)
        moments = mc_moments(model, x_all, samples, share_prefix=share_prefix)
        mean, var = (v.double().cpu().numpy() for v in moments)
        mean = mean * dm.y_std + dm.y_mean
        noise = float(np.mean((mean[: len(t_train)] - y_train) ** 2))  # homoscedastic noise: train residuals
        preds[name] = (mean, np.sqrt(var * dm.y_std**2 + noise), np.sqrt(var) * dm.y_std)
        seconds[name] = time.perf_counter() - start
    print(f"GP: fitting on {len(t_train[::gp_every])} training weeks (the longest step: minutes on a CPU)", flush=True)
    start = time.perf_counter()
    preds["GP"] = _gp_predict(t_train[::gp_every], y_train[::gp_every], t_all, gp_restarts, seed)
    seconds["GP"] = time.perf_counter() - start
    n = len(t_train)
    rows = {name: _metrics(*pred, y_test, n) for name, pred in preds.items()}
    table = markdown_table(rows, digits=3)
    figure = _plot(t_all, np.concatenate([y_train, y_test]), n, preds, dm.cutoff)
    figure.savefig(folder / "co2.png", dpi=80)
    (folder / "co2.md").write_text(table + "\n")
    (folder / "co2.json").write_text(json.dumps({"metrics": rows, "seconds": seconds, "samples": samples}, indent=1))
    print(table)
    print(f"seconds: {', '.join(f'{k} {v:.1f}' for k, v in seconds.items())}; wrote {folder}/co2.png, co2.md, co2.json")
    return rows


def _data_of(nets: dict[str, str]) -> CO2DataModule:
    """The data module the checkpoints were trained on (their saved data arguments must agree).

    Raises:
        ConfigError: a file is not a checkpoint of the CO2 regressor, or not of the activation it is passed as.
    """
    keys = ("holdout_years", "batch_size")
    found = {}
    for name, ckpt in nets.items():
        option = name.lower()
        checkpoint = read_checkpoint(ckpt, option, weights_only=False)
        saved = checkpoint.get("datamodule_hyper_parameters", {})
        hparams = checkpoint.get("hyper_parameters", {})
        if "holdout_years" not in saved or "activation" not in hparams:
            raise ConfigError(f"{option}: {ckpt} is not a checkpoint of the CO2 regressor (co2 fit writes those)")
        if hparams["activation"] != option:
            raise ConfigError(f"{option}: {ckpt} holds a {hparams['activation']} net, not a {option} one")
        found[name] = {k: saved[k] for k in keys if k in saved}
    if found["ReLU"].get("holdout_years") != found["Tanh"].get("holdout_years"):
        raise ConfigError(f"relu, tanh: the checkpoints hold out different years: {found}")
    dm = CO2DataModule(**found["ReLU"])
    dm.setup("test")
    return dm


def _gp_predict(t: np.ndarray, y: np.ndarray, t_all: np.ndarray, restarts: int, seed: int) -> tuple[np.ndarray, ...]:
    """The scikit-learn CO2 kernel: long-term RBF + seasonal ExpSineSquared×RBF + RationalQuadratic + noise."""
    require("sklearn")
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ExpSineSquared, RationalQuadratic, WhiteKernel

    seasonal = ExpSineSquared(length_scale=1.0, periodicity=1.0, periodicity_bounds="fixed")  # one year
    kernel = (
        50.0**2 * RBF(length_scale=50.0)
        + 2.0**2 * RBF(length_scale=100.0) * seasonal
        + 0.5**2 * RationalQuadratic(length_scale=1.0, alpha=1.0)
        + 0.1**2 * RBF(length_scale=0.1)
        + WhiteKernel(noise_level=0.1**2, noise_level_bounds=(1e-5, 1e5))
    )
    y_mean = y.mean()
    gp = GaussianProcessRegressor(kernel=kernel, n_restarts_optimizer=restarts, random_state=seed)
    gp.fit(t.reshape(-1, 1), y - y_mean)
    print(f"GP kernel after fit: {gp.kernel_}")
    mean, std = gp.predict(t_all.reshape(-1, 1), return_std=True)
    noise = gp.kernel_.k2.noise_level  # the WhiteKernel, the last term of the sum
    return mean + y_mean, std, np.sqrt(np.clip(std**2 - noise, 0, None))


def _metrics(mean: np.ndarray, std: np.ndarray, model_std: np.ndarray, y_test: np.ndarray, n: int) -> dict[str, float]:
    """RMSE and mean Gaussian NLL (ppm) on the held-out years; mean std (total, model part) inside/outside."""
    n_train = n
    mu, sd = mean[n_train:], std[n_train:]
    nll = 0.5 * np.log(2 * np.pi * sd**2) + (y_test - mu) ** 2 / (2 * sd**2)
    return {
        "RMSE held-out (ppm)": float(np.sqrt(np.mean((y_test - mu) ** 2))),
        "NLL held-out (nats)": float(nll.mean()),
        "std train (ppm)": float(std[:n_train].mean()),
        "std held-out (ppm)": float(sd.mean()),
        "model std train (ppm)": float(model_std[:n_train].mean()),
        "model std held-out (ppm)": float(model_std[n_train:].mean()),
    }


def _plot(t: np.ndarray, y: np.ndarray, n_train: int, preds: dict, cutoff: float) -> Any:
    """Three panels: the data, each model's mean ± 2 std, the train/extrapolation boundary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(preds), 1, figsize=(9, 2.6 * len(preds)), sharex=True, sharey=True)
    for ax, (name, (mean, std, _)), color in zip(axes, preds.items(), ("C0", "C3", "C2"), strict=True):
        ax.plot(t[:n_train], y[:n_train], ".", ms=1.5, color="k", label="train")
        ax.plot(t[n_train:], y[n_train:], ".", ms=1.5, color="0.6", label="held out")
        ax.plot(t, mean, color=color, lw=0.8, label=f"{name} mean")
        ax.fill_between(t, mean - 2 * std, mean + 2 * std, color=color, alpha=0.3, lw=0, label="± 2 std")
        ax.axvline(cutoff, color="k", ls="--", lw=0.8)
        ax.set_ylabel("CO2 (ppm)")
        ax.legend(loc="upper left", fontsize=7, markerscale=4)
    axes[0].set_ylim(y.min() - 15, y.max() + 15)
    axes[-1].set_xlabel("year (dashed: end of training data)")
    fig.tight_layout()
    return fig


def _report_main(args: list[str]) -> None:
    description = " ".join((report.__doc__ or "").split("Args:")[0].split())
    parser = ArgumentParser(prog=f"{PROG} report", description=description, exit_on_error=False)
    parser.add_function_arguments(report, as_positional=False)
    config = parser.parse_args(args)
    report(**{k: v for k, v in vars(config).items() if k in report.__annotations__})


def main(args: list[str]) -> None:
    """Run ``co2 <subcommand> …``; user mistakes end with one ``error:`` line and exit code 2."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")  # args come from co2 …
    try:
        if args and args[0] == "report":
            _report_main(list(args[1:]))
        else:
            CO2CLI(args=args)
    except (ConfigError, MisconfigurationException, ArgumentError, MissingExtraError) as err:
        print(f"error: {condense_error(str(err))}", file=sys.stderr)
        sys.exit(2)
