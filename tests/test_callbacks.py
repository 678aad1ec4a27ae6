"""ActivationVarianceMonitor: exact values, schedule, hook hygiene, every project model, TensorBoard, dropout effect.

All fits are tiny (a few batches of in-memory tensors on the CPU); no data files, no network.
The statistic is the population variance (``correction=0``) of each unit over the batch, averaged over units.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dropout_lab import callbacks as callbacks_module
from dropout_lab.callbacks import FIGURE_NAME, ActivationVarianceMonitor, activation_variance
from dropout_lab.dropout import Dropout, GaussianDropout, ScratchDropout
from dropout_lab.models import (
    ClassifierModule,
    DropConnectMLP,
    DropoutMLP,
    GaussianDropoutMLP,
    LeNet,
    ScratchDropoutMLP,
    StochasticActivationMLP,
)
from dropout_lab.plots import plot_activation_variance

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


def frozen_sgd(params):
    return torch.optim.SGD(params, lr=0.0)  # weights never change, so every batch sees the known weights


class TinyNet(ClassifierModule):
    """Flatten → Linear(in, width) → ReLU → noise → Linear(width, 10), trained with lr 0."""

    def __init__(self, in_features: int = 4, width: int = 3, noise: nn.Module | None = None) -> None:
        super().__init__(optimizer=frozen_sgd)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, width),
            nn.ReLU(),
            Dropout(0.0) if noise is None else noise,
            nn.Linear(width, 10),
        )


class FailingNet(TinyNet):
    """Raises in the second training step (after the hooks have been armed and used)."""

    def training_step(self, batch, batch_idx):
        if batch_idx == 1:
            assert self.net[2]._forward_hooks, "the monitor should be watching during fit"
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def loader(x: torch.Tensor, batch_size: int) -> DataLoader:
    y = torch.arange(len(x)) % 10
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def make_trainer(root: Path, monitor: ActivationVarianceMonitor, **kwargs) -> L.Trainer:
    kwargs.setdefault("max_epochs", 1)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=TensorBoardLogger(root, name="tb"),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        **kwargs,
    )


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def tb_events(log_dir: str) -> EventAccumulator:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    return events


# ---------------------------------------------------------------------------------------------- the statistic
def test_statistic_is_population_variance_per_unit_averaged_over_units():
    torch.manual_seed(0)
    maps = torch.randn(6, 3, 5, 4) * torch.arange(1.0, 4.0).view(1, 3, 1, 1)
    expected = np.var(maps.double().numpy(), axis=0, ddof=0).mean()  # one unit per (c, h, w)
    assert activation_variance(maps).item() == pytest.approx(expected, abs=1e-6)
    flat = torch.randn(10, 7)
    assert activation_variance(flat).item() == pytest.approx(flat.var(0, unbiased=False).mean().item(), abs=1e-6)
    assert activation_variance(torch.arange(4.0)).item() == pytest.approx(1.25)  # (N,) is one unit
    assert activation_variance(torch.randn(1, 8)).item() == 0.0  # a batch of one is defined
    assert activation_variance(torch.randn(4, 3, dtype=torch.float16)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- exact values
def test_logged_variance_equals_direct_computation(tmp_path: Path):
    torch.manual_seed(0)
    model = TinyNet()
    weight = torch.tensor([[0.5, -1.0, 0.25, 2.0], [-0.3, 0.8, 1.5, -0.7], [1.2, 0.1, -0.4, 0.6]])
    bias = torch.tensor([0.1, -0.2, 0.3])
    with torch.no_grad():
        model.net[1].weight.copy_(weight)
        model.net[1].bias.copy_(bias)
    x = torch.randn(48, 4)
    monitor = ActivationVarianceMonitor(every_n_steps=1, eval_batch=False)
    trainer = make_trainer(tmp_path, monitor, limit_train_batches=3)
    trainer.fit(model, loader(x, 16))

    expected = [torch.relu(xb @ weight.T + bias).var(0, unbiased=False).mean().item() for xb in x.split(16)]
    for layer in ("net.2", "net.3"):  # the ReLU, and Dropout(0) after it (identity)
        steps, values = zip(*monitor.history[layer], strict=True)
        assert steps == (0, 1, 2)
        assert values == pytest.approx(expected, abs=1e-6)
    assert set(monitor.history) == {"net.2", "net.3"}
    assert monitor.eval_history == {}

    scalars = tb_events(trainer.log_dir)
    logged = [(e.step, e.value) for e in scalars.Scalars("activation_var/net.2")]
    assert [s for s, _ in logged] == [0, 1, 2]
    assert [v for _, v in logged] == pytest.approx(expected, abs=1e-6)


def test_user_given_layers_watch_a_pre_activation(tmp_path: Path):
    torch.manual_seed(1)
    model = TinyNet()
    x = torch.randn(32, 4)
    monitor = ActivationVarianceMonitor(every_n_steps=1, layers=["net.1"], eval_batch=False)
    make_trainer(tmp_path, monitor, limit_train_batches=2).fit(model, loader(x, 16))
    linear = model.net[1]
    with torch.no_grad():
        expected = [linear(xb).var(0, unbiased=False).mean().item() for xb in x.split(16)]
    assert list(monitor.history) == ["net.1"]
    assert [v for _, v in monitor.history["net.1"]] == pytest.approx(expected, abs=1e-6)


def test_records_every_n_steps_only_and_hooks_idle_otherwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = []
    real = callbacks_module.activation_variance
    monkeypatch.setattr(callbacks_module, "activation_variance", lambda t: calls.append(1) or real(t))
    monitor = ActivationVarianceMonitor(every_n_steps=3, eval_batch=False)
    make_trainer(tmp_path, monitor, limit_train_batches=7).fit(TinyNet(), loader(torch.randn(70, 4), 10))
    assert [s for s, _ in monitor.history["net.2"]] == [0, 3, 6]
    assert len(calls) == 3 * 2  # 3 recorded steps x 2 watched layers; nothing computed on the other 4 steps


# ---------------------------------------------------------------------------------------------- hook hygiene
def test_no_hooks_left_after_fit_or_after_a_failing_fit(tmp_path: Path):
    model = TinyNet()
    monitor = ActivationVarianceMonitor(every_n_steps=1)
    make_trainer(tmp_path / "ok", monitor, limit_train_batches=2, limit_val_batches=1).fit(
        model, loader(torch.randn(32, 4), 16), loader(torch.randn(16, 4), 16)
    )
    assert no_hooks(model) and not monitor._handles
    assert monitor.eval_history  # the validation batch was captured

    failing = FailingNet()
    monitor = ActivationVarianceMonitor(every_n_steps=1)
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(tmp_path / "fail", monitor, limit_train_batches=3).fit(failing, loader(torch.randn(48, 4), 16))
    assert no_hooks(failing) and not monitor._handles


def test_unknown_layer_name_fails_with_the_names_and_leaves_no_hook(tmp_path: Path):
    model = TinyNet()
    monitor = ActivationVarianceMonitor(layers=["net.2", "net.99"])
    with pytest.raises(ValueError, match=r"layers: no module named 'net.99'.*net\.2"):
        make_trainer(tmp_path, monitor, limit_train_batches=1).fit(model, loader(torch.randn(16, 4), 16))
    assert no_hooks(model)


def test_constructor_rejects_bad_values():
    with pytest.raises(ValueError, match="every_n_steps"):
        ActivationVarianceMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="histogram_every_n_epochs"):
        ActivationVarianceMonitor(histogram_every_n_epochs=-1)


# ---------------------------------------------------------------------------------------------- every project model
MLP_LAYERS = ["net.1", "net.3", "net.4", "net.6", "net.7"]  # input dropout, then (ReLU, dropout) per hidden layer
MODELS: dict[str, tuple[Callable[[], ClassifierModule], list[str]]] = {
    "DropoutMLP": (lambda: DropoutMLP(hidden_sizes=(16, 8)), MLP_LAYERS),
    "GaussianDropoutMLP": (lambda: GaussianDropoutMLP(hidden_sizes=(16, 8)), MLP_LAYERS),
    "ScratchDropoutMLP": (
        lambda: ScratchDropoutMLP(hidden_sizes=(16, 8)),
        ["net.activation", "net.dropouts.0", "net.activation#2", "net.dropouts.1"],  # one ReLU module, called twice
    ),
    "DropConnectMLP": (lambda: DropConnectMLP(hidden_sizes=(16, 8)), ["net.1", "net.2", "net.4", "net.5"]),
    "StochasticActivationMLP": (lambda: StochasticActivationMLP(hidden_sizes=(16, 8)), ["net.2", "net.5"]),
    "LeNet": (lambda: LeNet(channels=(2, 4), hidden=8), ["net.1", "net.2", "net.5", "net.6", "net.10", "net.11"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
def test_runs_on_every_model_and_writes_tensorboard_and_png(name: str, tmp_path: Path):
    build, layers = MODELS[name]
    torch.manual_seed(0)
    model = build()
    images = torch.rand(48, 1, 28, 28)
    monitor = ActivationVarianceMonitor(every_n_steps=2, histogram_every_n_epochs=1)
    trainer = make_trainer(tmp_path, monitor, max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, loader(images, 16), loader(images[:16], 16))

    assert list(monitor.history) == layers
    assert {k: [s for s, _ in v] for k, v in monitor.history.items()} == {k: [0, 2, 4] for k in layers}
    assert {k: [s for s, _ in v] for k, v in monitor.eval_history.items()} == {k: [3, 6] for k in layers}
    assert no_hooks(model)
    png = Path(trainer.log_dir) / FIGURE_NAME
    assert monitor.figure_path == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    tags = tb_events(trainer.log_dir).Tags()
    assert {f"activation_var/{k}" for k in layers} <= set(tags["scalars"])
    assert {f"activation_var_eval/{k}" for k in layers} <= set(tags["scalars"])
    assert {f"activation_hist/{k}" for k in layers} <= set(tags["histograms"])
    assert {f"activation_hist_eval/{k}" for k in layers} <= set(tags["histograms"])
    assert "activation_variance" in tags["images"]


def test_eval_variance_of_conv_layer_matches_the_validation_batch(tmp_path: Path):
    torch.manual_seed(0)
    model = LeNet(channels=(2, 4), hidden=8, optimizer=frozen_sgd)
    images = torch.rand(16, 1, 28, 28)
    monitor = ActivationVarianceMonitor(every_n_steps=1)
    make_trainer(tmp_path, monitor, limit_train_batches=1, limit_val_batches=1).fit(
        model, loader(images, 16), loader(images, 16)
    )
    model.eval()
    with torch.no_grad():
        relu_maps = model.net[1](model.net[0](images))  # (16, 2, 28, 28)
    expected = np.var(relu_maps.double().numpy(), axis=0).mean()
    assert monitor.eval_history["net.1"] == [(1, pytest.approx(expected, abs=1e-6))]
    assert monitor.history["net.1"] == [(0, pytest.approx(expected, abs=1e-6))]  # before the ReLU, nothing is random


# ---------------------------------------------------------------------------------------------- dropout's effect
@pytest.mark.parametrize(
    "noise", [Dropout(0.5), ScratchDropout(0.5), GaussianDropout(0.5)], ids=lambda m: type(m).__name__
)
def test_dropout_raises_train_variance_by_the_analytic_amount(noise: nn.Module, tmp_path: Path):
    """Train-mode variance after the noise vs eval mode (identity), on one fixed batch X of N rows.

    With h = relu(X W^T + b) and y = h * m, E[m] = 1, Var(m) = p / (1 - p) (inverted dropout, and Gaussian
    dropout by construction), the expected population variance of unit j over the batch is
    Var_batch(h_j) + (1 - 1/N) * p/(1-p) * mean_i(h_ij^2). Averaged over units and compared with the mean of
    R recorded steps within 4 standard errors (seeded, so the check is also deterministic).
    """
    torch.manual_seed(0)
    n, r, p = 512, 12, 0.5
    model = TinyNet(in_features=8, width=32, noise=noise)
    x = torch.randn(n, 8)
    monitor = ActivationVarianceMonitor(every_n_steps=1)
    trainer = make_trainer(tmp_path, monitor, limit_train_batches=r, limit_val_batches=1)
    trainer.fit(model, loader(x.repeat(r, 1), n), loader(x, n))

    with torch.no_grad():
        h = model.net[2](model.net[1](x))
    eval_var = activation_variance(h).item()
    expected = eval_var + (1 - 1 / n) * p / (1 - p) * h.pow(2).mean().item()
    assert monitor.eval_history["net.3"] == [(r, pytest.approx(eval_var, abs=1e-6))]
    assert [v for _, v in monitor.history["net.2"]] == pytest.approx([eval_var] * r, abs=1e-6)

    train = np.array([v for _, v in monitor.history["net.3"]])
    standard_error = train.std(ddof=1) / np.sqrt(r)
    assert abs(train.mean() - expected) < 4 * standard_error + 1e-9
    # the ordering, per step: E[train] >= 2 * eval here (mean(h^2) >= Var(h)), and one step's relative spread
    # is ~1% (512 x 32 independent draws), so 1.5x leaves a margin of dozens of standard deviations
    assert (train > 1.5 * eval_var).all()


# ---------------------------------------------------------------------------------------------- DDP, config, plot
def test_only_rank_zero_writes_the_figure(tmp_path: Path):
    monitor = ActivationVarianceMonitor()
    monitor.history = {"net.2": [(0, 1.0), (50, 2.0)]}
    for rank_zero, folder in ((False, tmp_path / "rank1"), (True, tmp_path / "rank0")):
        trainer = SimpleNamespace(
            loggers=[], log_dir=str(folder), default_root_dir=str(folder), is_global_zero=rank_zero, global_step=50
        )
        monitor.on_train_end(trainer, TinyNet())
        assert (folder / FIGURE_NAME).exists() is rank_zero


def test_arguments_parse_from_config_with_help_text():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ActivationVarianceMonitor, "monitor")
    help_text = parser.format_help()
    for arg in ("every_n_steps", "layers", "eval_batch", "histogram_every_n_epochs"):
        assert f"--monitor.{arg}" in help_text
    assert "record the variances on every n-th optimizer step" in help_text
    cfg = parser.parse_object({"monitor": {"every_n_steps": 7, "layers": ["net.2"]}})
    monitor = parser.instantiate(cfg).monitor
    assert (monitor.every_n_steps, monitor.layers, monitor.histogram_every_n_epochs) == (7, ["net.2"], 0)
    with pytest.raises(Exception, match="every_n_steps"):
        parser.parse_object({"monitor": {"every_n_steps": 0}})


def test_configurable_from_yaml_under_trainer_callbacks(tmp_path: Path):
    from dropout_lab.cli import DropoutLabCLI

    config = tmp_path / "monitor.yaml"
    config.write_text(
        "trainer:\n  logger: false\n  callbacks:\n"
        "    - class_path: dropout_lab.callbacks.ActivationVarianceMonitor\n"
        "      init_args: {every_n_steps: 7, histogram_every_n_epochs: 2}\n"
    )
    cli = DropoutLabCLI(args=["--config", str(config)], run=False)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, ActivationVarianceMonitor)]
    assert (monitor.every_n_steps, monitor.histogram_every_n_epochs, monitor.eval_batch) == (7, 2, True)


def test_history_survives_a_checkpoint_round_trip():
    monitor = ActivationVarianceMonitor()
    monitor.history = {"net.2": [(0, 1.0), (50, 2.0)]}
    monitor.eval_history = {"net.2": [(100, 0.5)]}
    restored = ActivationVarianceMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert (restored.history, restored.eval_history) == (monitor.history, monitor.eval_history)


def test_plot_draws_train_solid_and_eval_dashed():
    fig = plot_activation_variance(
        {"net.2": [(0, 1.0), (10, 2.0)], "net.3": [(0, 3.0), (10, 4.0)]}, {"net.2": [(10, 0.5)]}, title="t"
    )
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert styles == {"net.2": "-", "net.3": "-", "net.2 (eval)": "--"}
    assert ax.get_yscale() == "log" and ax.get_title() == "t"
    assert plot_activation_variance({"a": [(0, 0.0), (1, 1.0)]}).axes[0].get_yscale() == "linear"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recording_step_does_not_sync_with_the_host_on_cuda():
    torch.manual_seed(0)
    model = TinyNet(in_features=8, width=16).cuda()
    x = torch.randn(64, 8, device="cuda")
    monitor = ActivationVarianceMonitor(every_n_steps=1)
    monitor._register(model)
    trainer = SimpleNamespace(loggers=[], is_global_zero=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        monitor._start("train", 0, record=True, capture=False)
        model(x)
        monitor._finish(trainer)  # queues an async copy to pinned memory: no sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
    monitor._flush(trainer, wait=True)
    monitor._remove_hooks()
    with torch.no_grad():
        expected = activation_variance(model.net[2](model.net[1](x))).item()
    assert monitor.history["net.2"] == [(0, pytest.approx(expected, abs=1e-6))]
    assert no_hooks(model)
