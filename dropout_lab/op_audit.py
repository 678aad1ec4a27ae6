"""What a training step asks of the device, counted on any device: ops that compute and ops that sync.

On a GPU the d2l MLP's step is bound by per-op launch and Python costs, and by host syncs (``.item()``,
``torch.tensor(v, device=...)``, data-dependent output sizes), which stop the CPU from queueing work ahead.
Both show up as the ops PyTorch dispatches, which a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
sees on the CPU as well: :class:`OpRecorder` counts them, :class:`StepAudit` does it per training step of a
``fit``. ``benchmarks/ops_per_step.py`` prints the counts per path; ``tests/test_host_sync.py`` asserts that no
step between log steps syncs (:class:`OpRecorder` says what a CPU run cannot see). Used by tests and benchmarks
only: recording slows every op down.
"""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["SYNCING_OPS", "VIEW_OPS", "OpRecorder", "StepAudit"]

SYNCING_OPS = frozenset({
    "_local_scalar_dense",  # item(), float(), int(), bool() of a tensor
    "lift_fresh",  # torch.tensor / as_tensor of Python data: a host-to-device copy on a GPU
    "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",  # output size read on the host
})  # fmt: skip
VIEW_OPS = frozenset({
    "view", "_unsafe_view", "detach", "alias", "t", "unsqueeze", "squeeze", "expand", "as_strided", "permute",
    "transpose", "slice", "select", "split", "split_with_sizes", "unbind", "_reshape_alias", "reshape",
})  # metadata only: no kernel on a GPU  # fmt: skip


class OpRecorder(TorchDispatchMode):
    """Counts the ops that compute (a kernel each on a GPU) and records the ops that would sync with a GPU.

    A syncing op is recorded with the line of code outside torch that asked for it. An explicit host copy
    (``x.to("cpu", copy=True)``) is recorded as one, and what is computed from such copies alone is neither
    counted nor a sync: it is host work even on a GPU machine, and the copy is where the sync was paid.

    Blind spots on a CPU: ``.cpu()``, ``.to("cpu")``, ``.tolist()`` and ``.numpy()`` of a CPU tensor dispatch
    nothing, so only a run on a GPU (the ``gpu`` test, with CUDA's own detector) sees those. The op counts are the
    dispatching device's: a CPU ``nn.Dropout`` is four ops where CUDA runs one fused ``native_dropout``, and
    CUDA's SGD uses ``_foreach`` ops.

    Args:
        host: the known host copies, shared by the recorders of one fit (a value logged in one step is read
            in the next ones); a fresh record if omitted.
    """

    def __init__(self, host: dict[int, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.computing: Counter[str] = Counter()
        self.syncing: Counter[tuple[str, str]] = Counter()
        self._host = {} if host is None else host  # id → tensor (kept alive, so an id is never reused)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        """Run the op, then classify it."""
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if inputs and all(id(t) in self._host for t in inputs):  # host work, also on a GPU machine
            self._host.update({id(t): t for t in tree_leaves(out) if isinstance(t, torch.Tensor)})
            return out
        to_host = name == "_to_copy" and kwargs.get("device") == torch.device("cpu")
        if to_host:  # an explicit host copy: itself a sync (a device-to-host copy on a GPU), its results are not
            self._host.update({id(t): t for t in tree_leaves(out) if isinstance(t, torch.Tensor)})
        if name in SYNCING_OPS or to_host:
            self.syncing[name, _caller()] += 1
        if name not in VIEW_OPS and name not in ("_local_scalar_dense", "lift_fresh"):  # copies, not kernels
            self.computing[name] += 1
        return out


def _caller() -> str:
    """``path:line`` of the innermost frame outside torch (and outside this module)."""
    frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
    frame = frames[-1]
    return f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"


class StepAudit(L.Callback):
    """One :class:`OpRecorder` per training step, from its ``on_train_batch_start`` to the next step's.

    So each record holds the step, its callbacks, the progress bar, the logger connector and the next batch's
    indexing. ``steps`` maps the epoch's batch index to its record (the last epoch run, for a multi-epoch fit).
    """

    def __init__(self) -> None:
        self.steps: dict[int, OpRecorder] = {}
        self._open: tuple[int, OpRecorder] | None = None
        self._host: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        """Close the previous step's record and open this step's."""
        self._close()
        recorder = OpRecorder(self._host)
        recorder.__enter__()
        self._open = batch_idx, recorder

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Close the epoch's last record."""
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Leave no recorder active after a failed fit."""
        self._close()

    def _close(self) -> None:
        if self._open is not None:
            batch_idx, recorder = self._open
            recorder.__exit__(None, None, None)
            self.steps[batch_idx] = recorder
            self._open = None
