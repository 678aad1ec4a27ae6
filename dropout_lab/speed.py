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

__all__ = ["CompileMode", "CompileModule"]

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class CompileModule(Callback):
    """``torch.compile`` the LightningModule's forward (and so its backward) for ``fit``.

    The module is compiled in place (``nn.Module.compile``): parameter names, checkpoints and the modules seen by
    other callbacks are unchanged. Compiled dropout draws its masks with the compiler's own random-number kernel,
    so the masks (and so the loss curve) differ from eager ones draw by draw but not in distribution; runs stay
    reproducible for a fixed seed on one machine. Validation and test run the same compiled forward in eval mode
    (one more compiled graph). The first steps pay the compilation (tens of seconds on a CPU).

    Args:
        mode: ``default``; ``reduce-overhead`` (CUDA graphs on a GPU: one replay per forward and per backward,
            dropout masks still fresh at every step); ``max-autotune``; ``max-autotune-no-cudagraphs``.
        fullgraph: fail instead of splitting the forward at code the compiler cannot trace.
        dynamic: treat the batch dimension as dynamic (one graph for every batch size) instead of compiling one
            graph per size seen (the full batch and the last, partial one); null = the compiler's default.
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
            pl_module._compiled_call_impl = None  # what nn.Module.compile set; no public way to undo it
