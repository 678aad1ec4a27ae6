"""MC-dropout regression on the Mauna Loa CO2 series (Gal & Ghahramani 2016): data module, regressor, MC moments.

Needs the optional extra ``[regression]`` (statsmodels ships the data inside the package: no download).
The report against a Gaussian process lives in :mod:`dropout_lab.regression_cli`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dropout_lab.dropout import Dropout
from dropout_lab.mc_passes import pass_runner
from dropout_lab.types import Probability, check_probability
from dropout_lab.uncertainty import (
    MEMORY_BUDGET,
    _check_passes,
    _on_module_device,
    _rows_per_forward,
    mc_mode,
)

__all__ = ["CO2DataModule", "MCDropoutRegressor", "MissingExtraError", "load_co2", "mc_moments", "require"]

INSTALL_HINT = "pip install -e '.[regression]'"


class MissingExtraError(ImportError):
    """A package of the optional ``[regression]`` extra is not installed; the message says how to install it."""


def require(name: str) -> Any:
    """Import ``name`` (statsmodels, sklearn) or raise :class:`MissingExtraError` with the install command."""
    if importlib.util.find_spec(name) is None:
        raise MissingExtraError(f"{name} is not installed; the CO2 regression needs the extra: {INSTALL_HINT}")
    return importlib.import_module(name)


def load_co2() -> tuple[np.ndarray, np.ndarray]:
    """The weekly Mauna Loa CO2 series of statsmodels (1958-03 to 2001-12) without its missing weeks.

    Returns:
        ``(t, co2)``: time in decimal years and CO2 in ppm, float64 arrays; the 59 weeks without a
        measurement are dropped (not interpolated), so every point is a real measurement.
    """
    require("statsmodels")
    from statsmodels.datasets import co2

    series = co2.load_pandas().data["co2"].dropna()
    index = series.index
    days = np.where(index.is_leap_year, 366.0, 365.0)
    t = index.year.to_numpy(np.float64) + (index.day_of_year.to_numpy(np.float64) - 1.0) / days
    return t, series.to_numpy(np.float64)


class CO2DataModule(L.LightningDataModule):
    """The CO2 series split in time: train on the earlier years, hold out the last ``holdout_years``.

    Missing weeks are dropped, not interpolated (see :func:`load_co2`). Time and CO2 are standardized with
    the mean and std of the training part only (``t_mean``, ``t_std``, ``y_mean``, ``y_std``), so the held-out
    years lie beyond the training range of the standardized time. Validation and test both use the held-out
    years (an extrapolation error to watch; nothing is selected on it: the last checkpoint is the model).

    Args:
        holdout_years: length in years of the final stretch held out for extrapolation.
        batch_size: training batch size (the held-out part is evaluated in one batch).
    """

    def __init__(self, holdout_years: PositiveFloat = 10.0, batch_size: PositiveInt = 128) -> None:
        super().__init__()
        require("statsmodels")
        self.save_hyperparameters()
        self.holdout_years = float(holdout_years)
        self.batch_size = batch_size
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        self.t_mean = self.t_std = self.y_mean = self.y_std = 0.0
        self.cutoff = 0.0

    def setup(self, stage: str | None = None) -> None:
        """Load the series, split it at ``last time − holdout_years`` and standardize (train statistics)."""
        if self.splits:
            return
        t, y = load_co2()
        self.cutoff = float(t[-1] - self.holdout_years)
        train = t < self.cutoff
        if train.sum() < 2 or (~train).sum() < 1:
            raise ValueError(f"data.holdout_years: {self.holdout_years} leaves no train or held-out weeks")
        self.t_mean, self.t_std = float(t[train].mean()), float(t[train].std())
        self.y_mean, self.y_std = float(y[train].mean()), float(y[train].std())
        for name, mask in (("train", train), ("test", ~train)):
            self.splits[name] = (self.scale_time(t[mask]), self.scale_co2(y[mask]))
        self.raw = {"train": (t[train], y[train]), "test": (t[~train], y[~train])}

    def scale_time(self, t: np.ndarray) -> Tensor:
        """Standardized time (N, 1) float32 from decimal years."""
        return torch.as_tensor((t - self.t_mean) / self.t_std, dtype=torch.float32).reshape(-1, 1)

    def scale_co2(self, y: np.ndarray) -> Tensor:
        """Standardized CO2 (N, 1) float32 from ppm."""
        return torch.as_tensor((y - self.y_mean) / self.y_std, dtype=torch.float32).reshape(-1, 1)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the training years."""
        return DataLoader(TensorDataset(*self.splits["train"]), batch_size=self.batch_size, shuffle=True)

    def _holdout(self) -> DataLoader:
        x, y = self.splits["test"]
        return DataLoader(TensorDataset(x, y), batch_size=len(x))

    def val_dataloader(self) -> DataLoader:
        """The held-out years in one batch (extrapolation error during training)."""
        return self._holdout()

    def test_dataloader(self) -> DataLoader:
        """The held-out years in one batch."""
        return self._holdout()

    def predict_dataloader(self) -> DataLoader:
        """Every week in time order (training years, then held-out years), 512 per batch."""
        x, y = (torch.cat(pair) for pair in zip(self.splits["train"], self.splits["test"], strict=True))
        return DataLoader(TensorDataset(x, y), batch_size=512)


class MCDropoutRegressor(L.LightningModule):
    """A deep dropout MLP for 1-D regression: ``num_layers`` × (Linear, activation, Dropout), then Linear.

    The dropout layers are the project's :class:`~dropout_lab.dropout.Dropout`, so :func:`mc_moments`
    (and :func:`~dropout_lab.uncertainty.mc_mode`) keep them random at prediction time. Logs ``train/loss``
    (MSE), ``val/loss``, ``val/rmse``, ``test/rmse`` (deterministic net, standardized units).

    Args:
        activation: hidden non-linearity.
        hidden_size: width of every hidden layer.
        num_layers: number of hidden layers.
        dropout: dropout probability after each hidden layer (0 ≤ p < 1).
        mc_samples: MC passes T used by ``predict`` (the ``report`` command sets its own).
        optimizer: optimizer factory; null = Adam, lr 1e-3, weight decay 1e-5.
        lr_scheduler: optional learning-rate scheduler factory, stepped once per epoch.
    """

    def __init__(
        self,
        activation: Literal["relu", "tanh"] = "relu",
        hidden_size: PositiveInt = 1024,
        num_layers: PositiveInt = 5,
        dropout: Probability = 0.2,
        mc_samples: PositiveInt = 100,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if activation not in ("relu", "tanh"):
            raise ValueError(f"model.activation must be 'relu' or 'tanh', got {activation!r}")
        check_probability(dropout, "model.dropout")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.mc_samples = mc_samples
        act = nn.ReLU if activation == "relu" else nn.Tanh
        layers: list[nn.Module] = []
        width = 1
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), act(), Dropout(dropout)]
            width = hidden_size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.loss_fn = nn.MSELoss()

    def forward(self, x: Tensor) -> Tensor:
        """Predictions (B, 1) for standardized times (B, 1)."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """MSE of one batch, logged as ``train/loss``."""
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        mse = self.loss_fn(self(x), y)
        self.log(f"{stage}/loss", mse, on_step=False, on_epoch=True)
        self.log(f"{stage}/rmse", mse.sqrt(), on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``val/loss`` (MSE) and ``val/rmse`` of the deterministic net."""
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``test/loss`` (MSE) and ``test/rmse`` of the deterministic net."""
        self._eval_step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """MC-dropout predictive mean and variance (N,) of ``mc_samples`` passes, and the targets (N,)."""
        x, y = batch
        mean, var = mc_moments(self, x, self.mc_samples)
        return {"mean": mean, "var": var, "target": y.reshape(-1)}

    def configure_optimizers(self) -> Any:
        """The injected optimizer (default Adam, lr 1e-3, weight decay 1e-5) and scheduler, if any."""
        params = self.parameters()
        if self.optimizer_factory is None:
            optimizer = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-5)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}


class _MomentAccumulator:
    """Running float64 sums of y and y² per input; the ``update``/``passes`` interface of the MC pass runner."""

    def __init__(self, n: int) -> None:
        self.n, self.passes = n, 0
        self.sums: Tensor | None = None

    def update(self, t0: int, n0: int, out: Tensor) -> None:
        """Add the block ``out`` (k passes, rows, D) for inputs ``n0:n0+rows``."""
        out = out.double()
        if self.sums is None:
            self.sums = torch.zeros(2, self.n, out.shape[-1], dtype=torch.float64, device=out.device)
        self.sums[0, n0 : n0 + out.shape[1]] += out.sum(0)
        self.sums[1, n0 : n0 + out.shape[1]] += out.square().sum(0)


def mc_moments(
    module: nn.Module,
    x: Tensor,
    T: int,
    chunk_size: int | None = None,
    memory_budget: int = MEMORY_BUDGET,
    share_prefix: bool = True,
) -> tuple[Tensor, Tensor]:
    """Mean and variance over T MC-dropout passes of a regression net's outputs, vectorized and chunked.

    The same machinery as :func:`~dropout_lab.uncertainty.mc_predict` (the batch repeated, T·N rows in chunks
    bounded by a memory budget, under :func:`~dropout_lab.uncertainty.mc_mode` and ``no_grad``), but the raw
    outputs are summarized by their first two moments instead of softmax statistics. Modes are restored.

    Args:
        module: a network or LightningModule mapping (N, ...) inputs to (N, D) outputs.
        x: inputs (N, ...), moved to the module's device.
        T: number of stochastic passes.
        chunk_size: rows (input copies) per forward; None = automatic, as in ``mc_predict``.
        memory_budget: elements allowed per layer tensor of one forward in the automatic chunk size.
        share_prefix: run the layers before the first dropout once per input, not once per pass (as in
            ``mc_predict``).

    Returns:
        ``(mean, var)``, float32 on the module's device: shape (N,) when D = 1, else (N, D); ``var`` is the
        spread of the passes (divided by T), the epistemic part of the predictive variance.
    """
    T = _check_passes(T)
    x = _on_module_device(module, x)
    with torch.no_grad(), mc_mode(module, per_sample_dropconnect=True):
        rows = chunk_size or _rows_per_forward(module, x, memory_budget, None)
        acc = _MomentAccumulator(x.shape[0])
        with pass_runner(module, x, share_prefix, rows) as run:
            run(T, rows, acc)
    assert acc.sums is not None
    mean = acc.sums[0] / T
    var = (acc.sums[1] / T - mean.square()).clamp_min(0)
    if mean.shape[-1] == 1:
        mean, var = mean.squeeze(-1), var.squeeze(-1)
    return mean.float(), var.float()
