"""Lightning callbacks: :class:`ActivationVarianceMonitor` (the d2l exercise on activation variance, as a callback).

Configure it from YAML::

    trainer:
      callbacks:
        - class_path: dropout_lab.callbacks.ActivationVarianceMonitor
          init_args: {every_n_steps: 50, histogram_every_n_epochs: 0}
"""

from __future__ import annotations

import functools
from collections import deque
from pathlib import Path
from typing import Any, Literal

import lightning as L
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from dropout_lab.activation_stats import ACTIVATION_TYPES, activation_variance
from dropout_lab.dropout import StochasticModule
from dropout_lab.pending import PendingValues

__all__ = ["ACTIVATION_TYPES", "ActivationVarianceMonitor", "activation_variance"]

FIGURE_NAME = "activation_variance.png"
Kind = Literal["train", "eval"]
_PREFIX: dict[str, str] = {"train": "activation_var", "eval": "activation_var_eval"}
_HIST_PREFIX: dict[str, str] = {"train": "activation_hist", "eval": "activation_hist_eval"}


class ActivationVarianceMonitor(L.Callback):
    """Logs the variance of hidden activations during training, with dropout (train) and without (eval).

    Forward hooks on the watched layers compute, inside the normal training forward, the per-unit variance
    across the batch averaged over units (population variance; conv maps: one unit per (c, h, w)). It is
    recorded every ``every_n_steps`` optimizer steps (steps 0, n, 2n, …; the hooks return at once on the other
    steps), kept on the device and copied to the host asynchronously, so no step waits for the accelerator.
    Values are logged to every logger as ``activation_var/<layer>`` at the global step, and, on the first
    validation batch of each validation run (eval mode, no dropout), as ``activation_var_eval/<layer>``.
    ``<layer>`` is the module's path in the LightningModule (e.g. ``net.3``); a module called k > 1 times per
    forward (a shared activation) gets ``<layer>#2`` … for its later calls. ``history`` / ``eval_history``
    hold ``{layer: [(step, variance), ...]}``. At the end of training a figure (train solid, eval dashed) is saved
    as ``activation_variance.png`` in ``trainer.log_dir`` and added to TensorBoard (rank zero only).

    Args:
        every_n_steps: record the variances on every n-th optimizer step (global steps 0, n, 2n, …).
        layers: module names to watch (as in ``model.named_modules()``, e.g. ``net.2``); null = every
            activation module (ReLU, Tanh, Sigmoid, GELU, …) and every dropout-family (``StochasticModule``) layer.
        eval_batch: also record the variances on the first validation batch of each validation run (eval
            mode, so dropout is off), logged as ``activation_var_eval/<layer>``.
        histogram_every_n_epochs: every n-th epoch (0, n, 2n, …), send histograms of the watched activations
            to TensorBoard (first training batch of the epoch, and first validation batch after it); 0 = off.
    """

    def __init__(
        self,
        every_n_steps: PositiveInt = 50,
        layers: list[str] | None = None,
        eval_batch: bool = True,
        histogram_every_n_epochs: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if not isinstance(histogram_every_n_epochs, int) or histogram_every_n_epochs < 0:
            raise ValueError(f"histogram_every_n_epochs must be an integer >= 0, got {histogram_every_n_epochs!r}")
        self.every_n_steps = every_n_steps
        self.layers = list(layers) if layers is not None else None
        self.eval_batch = eval_batch
        self.histogram_every_n_epochs = histogram_every_n_epochs
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.eval_history: dict[str, list[tuple[int, float]]] = {}
        self.watched: dict[str, nn.Module] = {}
        self.figure_path: Path | None = None
        self._handles: list[RemovableHandle] = []
        self._pending: deque[PendingValues] = deque()
        self._reset_capture()
        self._last_step = -1
        self._state_key: str | None = None

    @property
    def state_key(self) -> str:
        """Identifies this callback's state in a checkpoint (by ``every_n_steps`` and ``layers``)."""
        if self._state_key is None:  # Lightning reads it on every hook call: build the string once
            self._state_key = self._generate_state_key(every_n_steps=self.every_n_steps, layers=self.layers)
        return self._state_key

    # ------------------------------------------------------------------------------------------- hooks
    def _reset_capture(self) -> None:
        self._active = self._record = self._capture = False
        self._kind: Kind = "train"
        self._step = 0
        self._values: dict[str, Tensor] = {}
        self._hist: dict[str, Tensor] = {}
        self._calls: dict[str, int] = {}

    def _hook(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if not self._active or not isinstance(output, Tensor) or output.dim() == 0:
            return
        count = self._calls.get(name, 0) + 1
        self._calls[name] = count
        key = name if count == 1 else f"{name}#{count}"
        if self._record:
            self._values[key] = activation_variance(output)
        if self._capture:
            self._hist[key] = output.detach().clone()

    def _select(self, pl_module: L.LightningModule) -> dict[str, nn.Module]:
        modules = dict(pl_module.named_modules())
        if self.layers is None:
            default = (*ACTIVATION_TYPES, StochasticModule)
            return {name: m for name, m in modules.items() if name and isinstance(m, default)}
        missing = [name for name in self.layers if name not in modules]
        if missing:
            known = ", ".join(name for name in modules if name) or "(none)"
            raise ValueError(
                f"ActivationVarianceMonitor.layers: no module named {', '.join(map(repr, missing))} in "
                f"{type(pl_module).__name__}; choose from: {known}"
            )
        return {name: modules[name] for name in self.layers}

    def _register(self, pl_module: L.LightningModule) -> None:
        self._remove_hooks()
        self.watched = self._select(pl_module)
        if not self.watched:
            rank_zero_warn(f"ActivationVarianceMonitor: {type(pl_module).__name__} has no layer to watch")
        for name, module in self.watched.items():
            self._handles.append(module.register_forward_hook(functools.partial(self._hook, name)))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reset_capture()

    def _start(self, kind: Kind, step: int, record: bool, capture: bool) -> None:
        if not (record or capture or self._active):
            return  # the common case: nothing armed before, nothing to arm now
        self._reset_capture()
        self._kind, self._step, self._record, self._capture = kind, step, record, capture
        self._active = record or capture

    def _finish(self, trainer: L.Trainer) -> None:
        if not self._active:
            return
        if self._record and self._values:
            self._pending.append(PendingValues.start(self._kind, self._step, self._values))
            if self._kind == "train":
                self._last_step = self._step
        if self._capture and self._hist:
            for logger in _tensorboards(trainer):
                for name, values in self._hist.items():
                    logger.experiment.add_histogram(f"{_HIST_PREFIX[self._kind]}/{name}", values, self._step)
        self._reset_capture()

    def _flush(self, trainer: L.Trainer, wait: bool) -> None:
        """Move finished variances into the history and the loggers (``wait``: also the unfinished ones)."""
        while self._pending and (wait or self._pending[0].ready()):
            item = self._pending.popleft()
            history = self.history if item.kind == "train" else self.eval_history
            metrics = {}
            for name, value in zip(item.names, item.floats(), strict=True):
                history.setdefault(name, []).append((item.step, value))
                metrics[f"{_PREFIX[item.kind]}/{name}"] = value
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=item.step)

    def _histogram_epoch(self, trainer: L.Trainer) -> bool:
        n = self.histogram_every_n_epochs
        return n > 0 and trainer.current_epoch % n == 0 and trainer.is_global_zero and bool(_tensorboards(trainer))

    # ------------------------------------------------------------------------------------------- Lightning
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Start a fit with an empty history (a checkpoint restored afterwards brings its own)."""
        if stage == "fit":
            self.history, self.eval_history = {}, {}
            self._pending.clear()
            self._last_step = -1
            self.figure_path = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find the layers to watch and register the forward hooks."""
        self._register(pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Arm the hooks on a recording step (every ``every_n_steps``); log what earlier steps measured."""
        self._flush(trainer, wait=False)
        step, n = trainer.global_step, self.every_n_steps
        # with micro-batches global_step advances by K per batch: record the first step past each multiple of n
        crossed = self._last_step >= 0 and step // n > self._last_step // n
        record = step != self._last_step and (step % n == 0 or crossed)
        capture = batch_idx == 0 and self._histogram_epoch(trainer)
        self._start("train", step, record, capture)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        """Queue the variances of the step's (first) forward and disarm the hooks.

        With ``model.micro_batch_size`` one Lightning step runs several forwards and optimizer steps; only the
        first micro-batch's forward is recorded, like one forward of a batch-``micro_batch_size`` run.
        """
        if self._kind == "train":
            self._finish(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Queue the variances captured during this step's forward (no host sync) and disarm the hooks."""
        self._finish(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log everything measured this epoch."""
        self._flush(trainer, wait=True)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Arm the hooks on the first validation batch (eval mode) of a validation run during fit."""
        if batch_idx == 0 and dataloader_idx == 0 and self._handles and not trainer.sanity_checking:
            self._start("eval", trainer.global_step, self.eval_batch, self._histogram_epoch(trainer))

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Queue the eval-mode variances of the first validation batch."""
        self._finish(trainer)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the eval-mode variances."""
        self._flush(trainer, wait=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log what is left; rank zero saves the figure in ``trainer.log_dir`` and adds it to TensorBoard."""
        self._flush(trainer, wait=True)
        log_dir = trainer.log_dir or trainer.default_root_dir  # every rank: log_dir broadcasts
        if not trainer.is_global_zero or not (self.history or self.eval_history):
            return
        import matplotlib.image

        from dropout_lab.plots import plot_activation_variance, render_rgba

        labels = {}
        for key in (*self.history, *self.eval_history):
            module = self.watched.get(key.split("#")[0])
            labels[key] = f"{key} ({type(module).__name__})" if module is not None else key
        fig = plot_activation_variance(
            self.history,
            self.eval_history,
            title=f"{type(pl_module).__name__}: activation variance, train (solid) vs eval (dashed)",
            labels=labels,
        )
        pixels = render_rgba(fig)  # rendered once for the file and for TensorBoard
        self.figure_path = Path(log_dir) / FIGURE_NAME
        self.figure_path.parent.mkdir(parents=True, exist_ok=True)
        matplotlib.image.imsave(self.figure_path, pixels)
        for logger in _tensorboards(trainer):
            logger.experiment.add_image("activation_variance", pixels[..., :3], trainer.global_step, dataformats="HWC")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remove the hooks."""
        self._remove_hooks()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Remove the hooks when fit fails (Lightning then skips ``on_fit_end`` and ``teardown``)."""
        self._remove_hooks()
        self._pending.clear()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Remove the hooks (in case ``on_fit_end`` did not run)."""
        self._remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        """The histories, so a resumed fit continues them."""
        return {"history": self.history, "eval_history": self.eval_history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the histories saved by :meth:`state_dict`."""
        self.history = {k: [tuple(p) for p in v] for k, v in state_dict.get("history", {}).items()}
        self.eval_history = {k: [tuple(p) for p in v] for k, v in state_dict.get("eval_history", {}).items()}
        # the recording rule counts from the last recorded step (micro-batches move global_step by K a batch)
        self._last_step = max((int(step) for records in self.history.values() for step, _ in records), default=-1)


def _tensorboards(trainer: L.Trainer) -> list[TensorBoardLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
