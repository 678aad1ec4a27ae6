"""``DirectSteps``: the backward and optimizer step of one micro-batch, with Lightning's hooks but not its dispatch.

With ``model.micro_batch_size`` every optimizer step goes through ``manual_backward`` and ``LightningOptimizer.step``.
Those dispatch three hooks (``on_before_backward``, ``on_after_backward``, ``on_before_optimizer_step``) to every
callback, then to the module, each through the profiler, and they pass the step through the strategy and the
precision plugin to the optimizer inside a double closure. None of that is arithmetic: measured on a 2-core
x86_64 CPU it is 93–134 µs of Python per step, 160–268 µs with the callbacks of a CLI ``fit`` (two runs of
``benchmarks/step_dispatch.py``). On a GPU, where a step of the d2l MLP is launch-bound and takes under a
millisecond, Python time is step time. ``DirectSteps`` does the same step in a shorter way:

* ``module.backward(loss)``, which is what the precision plugin calls;
* the hooks that some callback or the module overrides, in Lightning's order (callbacks first, then the module)
  and with ``_current_fx_name`` set as Lightning sets it (so ``self.log`` works in them);
* ``optimizer.step(closure)`` between the manual loop's own step counters (``global_step`` and checkpoints count
  as before), the closure calling ``on_before_optimizer_step`` as Lightning's does (after the optimizer's own
  step pre-hooks).

The hooks are looked up once per fit, on the classes of the callbacks and the module (Lightning's
``is_overridden``): a hook set on an instance, a ``Mock`` callback or a callback added during the fit is not
seen; set ``ClassifierModule.direct_steps = False`` for those.

The ops are the same, so the updates are the same bit for bit (tested against Lightning's dispatch, also with hooks
that callbacks and the module override). It is used only where the shortcut leaves nothing out:
:func:`direct_steps_refusal` names what rules it out. That is a strategy other than one device (DDP's backward
hooks), a gradient scaler (``16-mixed``), a profiler, or a precision plugin other than Lightning's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden

__all__ = ["DirectSteps", "direct_steps_refusal"]

HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
_PLAIN_PLUGINS = (Precision, HalfPrecision, DoublePrecision)

Hook = tuple[Callable[..., Any], bool]  # (bound method, is a callback's)


def direct_steps_refusal(trainer: L.Trainer) -> str | None:
    """Why :class:`DirectSteps` cannot stand in for Lightning's dispatch in this Trainer (None: it can)."""
    if type(trainer.strategy) is not SingleDeviceStrategy:
        return f"strategy {type(trainer.strategy).__name__}"
    plugin = trainer.precision_plugin
    if type(plugin) is MixedPrecision:
        if plugin.scaler is not None:
            return "a gradient scaler (16-mixed)"
    elif type(plugin) not in _PLAIN_PLUGINS:
        return f"precision plugin {type(plugin).__name__}"
    if not isinstance(trainer.profiler, PassThroughProfiler):
        return f"profiler {type(trainer.profiler).__name__}"
    return None


class DirectSteps:
    """Backward + optimizer step of one micro-batch for ``module`` under ``trainer``, built once per fit.

    Args:
        trainer: the fitting Trainer (:func:`direct_steps_refusal` must have returned None for it).
        module: the LightningModule being fitted.
        optimizer: the ``LightningOptimizer`` of ``module.optimizers()`` (its step counters are the manual loop's).
    """

    def __init__(self, trainer: L.Trainer, module: L.LightningModule, optimizer: LightningOptimizer) -> None:
        self.trainer, self.module, self.optimizer = trainer, module, optimizer
        self.hooks: dict[str, list[Hook]] = {name: [] for name in HOOKS}
        for name in HOOKS:
            for callback in trainer.callbacks:
                if is_overridden(name, callback, Callback):
                    self.hooks[name].append((getattr(callback, name), True))
            if is_overridden(name, module, L.LightningModule):
                self.hooks[name].append((getattr(module, name), False))

    def step(self, loss: torch.Tensor) -> None:
        """``manual_backward(loss)`` then ``optimizer.step()``: the same hooks, ops and step count."""
        self._call("on_before_backward", loss)
        self.module.backward(loss)
        self._call("on_after_backward")
        optimizer, torch_optimizer = self.optimizer, self.optimizer.optimizer
        optimizer._on_before_step()  # the manual loop's counter (ready)
        # as a closure, as Lightning calls the hook: after the optimizer's own step pre-hooks, with grad enabled
        torch_optimizer.step(lambda: self._call("on_before_optimizer_step", torch_optimizer))
        optimizer._on_after_step()  # completed: global_step

    def _call(self, name: str, *args: Any) -> None:
        hooks = self.hooks[name]
        if not hooks:
            return
        module, previous = self.module, self.module._current_fx_name
        module._current_fx_name = name
        for fn, is_callback in hooks:
            if is_callback:
                fn(self.trainer, module, *args)
            else:
                fn(*args)
        module._current_fx_name = previous
