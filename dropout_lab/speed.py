"""Speed callbacks for every LightningModule here: ``CompileModule`` and ``UniformDropoutMasks``.

``CompileModule`` runs ``torch.compile`` for ``fit``; ``UniformDropoutMasks`` draws cheaper dropout masks on the
CPU.

The other speed options live where they act: ``model.micro_batch_size`` in
:class:`~dropout_lab.classifier.ClassifierModule`, ``--float32_matmul_precision`` in the CLI,
``trainer.precision`` and ``trainer.barebones`` in the Trainer, fused optimizers in ``model.optimizer``. The
README's *Performance* section lists what each one measured.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn

from dropout_lab.dropout import Dropout

__all__ = ["CompileMode", "CompileModule", "UniformDropoutMasks"]

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class CompileModule(Callback):
    """``torch.compile`` the LightningModule's forward (and so its backward) for ``fit``.

    The module is compiled in place (``nn.Module.compile``): parameter names, checkpoints and the modules seen by
    other callbacks are unchanged. Compiled dropout draws its masks with the compiler's own random-number kernel,
    so the masks (and so the loss curve) differ from eager ones draw by draw but not in distribution; runs stay
    reproducible for a fixed seed on one machine. Validation during ``fit`` runs the compiled forward in eval
    mode (one more graph); after ``fit`` (or a failed ``fit``) the module runs eagerly again, so the test after
    fit and the MC commands are eager. The first steps pay the compilation (seconds to tens of seconds).

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

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Return the module to eager execution after ``fit`` (the test after fit then runs eagerly)."""
        if stage == "fit":
            _uncompile(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Also after a failed or interrupted ``fit`` (Lightning skips ``teardown`` then)."""
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
