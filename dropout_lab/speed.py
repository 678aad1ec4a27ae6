"""``CompileModule``: ``torch.compile`` for ``fit``, as a callback, so it works with every LightningModule here.

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

__all__ = ["CompileMode", "CompileModule"]

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
