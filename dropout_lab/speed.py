"""Speed callbacks for every LightningModule here: ``CompileModule``, ``UniformDropoutMasks`` and ``EpochTimer``.

``CompileModule`` runs ``torch.compile`` for ``fit``; ``UniformDropoutMasks`` draws cheaper dropout masks on the
CPU; ``EpochTimer`` measures what they buy: seconds per training epoch, logged and summarized after ``fit``.

The other speed options live where they act: ``model.micro_batch_size`` in
:class:`~dropout_lab.classifier.ClassifierModule`, ``--float32_matmul_precision`` in the CLI,
``trainer.precision`` and ``trainer.barebones`` in the Trainer, fused optimizers in ``model.optimizer``. The
README's *Performance* section lists what each one measured.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from dropout_lab.dropout import Dropout

__all__ = ["CompileMode", "CompileModule", "EpochTime", "EpochTimer", "UniformDropoutMasks"]

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class CompileModule(Callback):
    """``torch.compile`` the LightningModule's forward (and so its backward) for ``fit``.

    The module is compiled in place (``nn.Module.compile``): parameter names, checkpoints and the modules seen by
    other callbacks are unchanged. Compiled dropout draws its masks with the compiler's own random-number kernel,
    so the masks (and so the loss curve) differ from eager ones draw by draw but not in distribution; runs stay
    reproducible for a fixed seed on one machine. Validation during ``fit`` runs the compiled forward in eval
    mode (one more graph). Lightning runs that validation under ``torch.no_grad``, not ``torch.inference_mode``,
    so no graph is compiled under inference mode, which can break the training graphs compiled after it
    (pytorch/pytorch#135892, CUDA graphs); a test checks this for the sanity check too. After ``fit`` (or a failed
    ``fit``) the module runs eagerly again, so the test after fit and the MC commands are eager, and its
    gradients are cleared (set to None, as Lightning does before each validation) before Lightning moves it to
    the CPU: under CUDA graphs they live in the graphs' memory. The first steps pay the compilation (seconds to
    tens of seconds).

    Args:
        mode: ``default``; ``reduce-overhead`` (CUDA graphs on a GPU: one replay per forward and per backward,
            dropout masks still fresh at every step; on a CPU the same as ``default``); ``max-autotune``;
            ``max-autotune-no-cudagraphs``.
        fullgraph: fail instead of splitting the forward at code the compiler cannot trace.
        dynamic: ``true``: one graph with a symbolic batch size from the start; ``false``: one graph per batch
            size seen (the full batch and the last, partial one); null: the compiler's default (static at
            first, a symbolic graph once a second size appears).
    """

    def __init__(self, mode: CompileMode = "default", fullgraph: bool = False, dynamic: bool | None = None) -> None:
        self.mode, self.fullgraph, self.dynamic = mode, fullgraph, dynamic

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Compile the module before ``fit`` starts (other stages run it as it is)."""
        if stage == "fit":
            pl_module.compile(mode=self.mode, fullgraph=self.fullgraph, dynamic=self.dynamic)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Clear the gradients before Lightning's teardown copies them (``module.cpu()``)."""
        pl_module.zero_grad(set_to_none=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Return the module to eager execution after ``fit`` (the test after fit then runs eagerly)."""
        if stage == "fit":
            _uncompile(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Also after a failed or interrupted ``fit`` (Lightning skips ``teardown`` then, but not the move)."""
        pl_module.zero_grad(set_to_none=True)
        _uncompile(pl_module)


def _uncompile(module: nn.Module) -> None:
    module._compiled_call_impl = None  # what nn.Module.compile set; torch has no public way to undo it


class UniformDropoutMasks(Callback):
    """Dropout layers draw their keep masks as ``uniform > p`` (the scratch kernel), not with ``bernoulli_``.

    PyTorch's CPU dropout draws its mask with ``bernoulli_``, which on the CPU is slower than a uniform draw
    and a comparison: ``benchmarks/dropout_kernel.py`` measured a ``Dropout(0.5)`` forward + backward 1.5 times
    and a large MC forward 1.8 times as fast with uniform masks. With this callback every layer of the class
    ``dropout_lab.dropout.Dropout`` runs the kernel of ``dropout_lab.dropout.scratch_dropout`` instead: the same
    inverted dropout (keep probability 1 - p, scale 1/(1 - p), the forward's mask reused by the backward;
    uniforms drawn in float32 also under bf16/fp16 autocast), other random draws, so results differ from the
    default draw by draw but not in distribution. It acts from setup to teardown of every stage the Trainer
    runs (``fit``, ``validate``, ``test``, ``predict``, so the ``mc`` subcommand's predictions too; its T curve,
    computed after the Trainer's ``predict``, and ``rotated`` run outside them) and restores the layers afterwards, also
    after a failed run. Channel dropout (``Dropout2d``) draws one number per channel and is left alone. bf16/fp16
    activations on the CPU (bf16 autocast) take the uniform kernel anyway, so there the callback changes nothing.

    Args:
        cpu_only: act only when the Trainer runs on the CPU; on a GPU, PyTorch's dropout is one fused kernel
            (draw, scale and multiply), where uniform masks take four (draw, compare and two multiplies).
    """

    def __init__(self, cpu_only: bool = True) -> None:
        self.cpu_only = cpu_only
        self._switched: list[Dropout] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Switch the module's ``Dropout`` layers to uniform masks (unless ``cpu_only`` and not on the CPU)."""
        if self.cpu_only and trainer.strategy.root_device.type != "cpu":
            return
        self._switched = [m for m in pl_module.modules() if isinstance(m, Dropout) and not m.uniform_masks]
        for m in self._switched:
            m.uniform_masks = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Give the layers PyTorch's kernel back."""
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Also after a failed or interrupted run (Lightning skips ``teardown`` then)."""
        self._restore()

    def _restore(self) -> None:
        for m in self._switched:
            m.uniform_masks = False
        self._switched = []


FASHION_MNIST_TRAIN = 60_000  # the unit of the README's speed tables: seconds per 60k training images


@dataclass(frozen=True)
class EpochTime:
    """One timed training epoch.

    Attributes:
        epoch: the Trainer's epoch number (0-based).
        train_s: wall seconds of the epoch's training steps (validation during the epoch excluded).
        epoch_s: wall seconds from the epoch's start to its end, validation included.
        images: training images of the epoch (per model: a population's members share each batch's rows).
    """

    epoch: int
    train_s: float
    epoch_s: float
    images: int

    @property
    def images_per_s(self) -> float:
        """Training throughput of the epoch."""
        return self.images / self.train_s if self.train_s > 0 else float("nan")


class EpochTimer(Callback):
    """Seconds per training epoch: logged at every epoch end and summarized after ``fit``.

    Each epoch records the wall time of its training steps (validation run during the epoch is timed apart and
    left out) and of the whole epoch with validation, from ``on_train_epoch_start`` to ``on_train_epoch_end``
    (checkpoints written after that hook are not counted). On a CUDA device it waits for the GPU at those points
    only, never inside a step, so the times include the queued GPU work while the steps keep no host sync. The
    first epoch a process runs also pays compilation, CUDA-graph capture and warm-up; the summary printed after
    ``fit`` shows it apart and gives the median of the later epochs (the steady state) and the training
    throughput, also as seconds per 60k images, the unit of the README's speed tables. It keeps nothing in
    checkpoints: a resumed run times its own epochs, and its first again pays the warm-up. Add it with
    ``--trainer.callbacks+=dropout_lab.speed.EpochTimer``.

    Args:
        log: also write ``time/train_epoch_s``, ``time/epoch_s`` and ``time/train_images_per_s`` to the
            Trainer's loggers at every epoch end (x-axis: optimizer steps).
        verbose: print the summary after ``fit`` (on the global rank zero).
    """

    def __init__(self, log: bool = True, verbose: bool = True) -> None:
        self.log, self.verbose = log, verbose
        self.epochs: list[EpochTime] = []
        self._start: float | None = None
        self._validation_start: float | None = None
        self._validation_s = 0.0
        self._images = 0

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the epoch's clock."""
        self._validation_s, self._images = 0.0, 0
        self._start = self._now(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the batch's images (a shape read: no host sync)."""
        self._images += _batch_rows(batch)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop counting training time while an in-epoch validation runs (not the sanity check before fit)."""
        if self._start is not None and not trainer.sanity_checking:
            self._validation_start = self._now(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Add the validation's time to the epoch's validation share."""
        if self._validation_start is not None:
            self._validation_s += self._now(pl_module) - self._validation_start
            self._validation_start = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record (and log) the epoch."""
        if self._start is None:
            return
        epoch_s = self._now(pl_module) - self._start
        self._start = None
        record = EpochTime(trainer.current_epoch, epoch_s - self._validation_s, epoch_s, self._images)
        self.epochs.append(record)
        if self.log:
            metrics = {
                "time/train_epoch_s": record.train_s,
                "time/epoch_s": record.epoch_s,
                "time/train_images_per_s": record.images_per_s,
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the summary."""
        if self.verbose and trainer.is_global_zero and self.epochs:
            print(self.summary(), flush=True)

    def steady(self) -> list[EpochTime]:
        """The epochs after this process's first (which pays compilation and warm-up); all if only one ran."""
        return self.epochs[1:] or self.epochs

    def summary(self) -> str:
        """The first epoch, then the median of the steady epochs: training s, s per 60k images, s with validation."""
        first, steady = self.epochs[0], self.steady()
        head = f"EpochTimer: first epoch {first.train_s:.3f} s of training ({first.epoch_s:.3f} s with validation)"
        if len(self.epochs) == 1:
            return head + "; one epoch only, so no steady state apart from compilation and warm-up"
        train = statistics.median(e.train_s for e in steady)
        whole = statistics.median(e.epoch_s for e in steady)
        rate = statistics.median(e.images_per_s for e in steady)
        images = statistics.median(e.images for e in steady)
        later = (
            f"epochs {steady[0].epoch + 1}-{steady[-1].epoch + 1}"
            if len(steady) > 1
            else f"epoch {steady[0].epoch + 1}"
        )
        return (
            f"{head}; {later} (median of {len(steady)}): {train:.3f} s of training for {images:.0f} images = "
            f"{rate:.0f} images/s = {FASHION_MNIST_TRAIN / rate:.3f} s per 60k images; {whole:.3f} s with "
            "validation"
        )


def _batch_rows(batch: Any) -> int:
    """Rows of a training batch: the labels' last dimension (``(B,)``, or ``(S, B)`` for stacked orders)."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[-1], torch.Tensor):
        labels = batch[-1]
        return int(labels.shape[-1]) if labels.ndim else 1
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    return 0
