"""How :func:`~dropout_lab.uncertainty.mc_predict` runs T passes: the batch repeated, in chunks, prefix shared.

:func:`pass_runner` returns ``run(passes, rows, acc)``, which adds passes to an accumulator (``acc.update(t0,
n0, block)`` with blocks of (passes, inputs, C)). Plain: each forward takes whole passes of the batch, or a
slice of one pass. With the prefix shared: the layers before the first noise layer (found by
:func:`first_noise_layer`) run once per input, a forward pre-hook repeating that layer's input once per pass,
after a check that this gives the network's own passes.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import Tensor, nn

from dropout_lab.dropout import StochasticModule

__all__ = ["PassAccumulator", "PrefixSharingError", "first_noise_layer", "pass_runner"]


class PassAccumulator(Protocol):
    """What the passes are added to: ``passes`` done so far, and ``update`` with a block of outputs."""

    passes: int

    def update(self, t0: int, n0: int, out: Tensor) -> None:
        """Add ``out`` (k passes, rows, C): passes ``t0:t0+k`` of inputs ``n0:n0+rows``."""


class _FirstNoiseLayer(Exception):
    """Raised by the probe's pre-hook to stop the forward at the first noise layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def first_noise_layer(module: nn.Module, x: Tensor) -> nn.Module | None:
    """The first layer, in the order a forward of ``x`` calls them, that draws noise (a stochastic layer).

    Found with a forward of ``x[:1]`` that stops at that layer's input, so no random number is drawn; call it
    under :func:`~dropout_lab.uncertainty.mc_mode` (or with the flags the passes will use). None when no layer
    draws noise.
    """

    def hook(m: nn.Module, args: tuple) -> None:
        raise _FirstNoiseLayer(m)

    noisy = [m for m in module.modules() if isinstance(m, StochasticModule) and m.stochastic]
    handles = [m.register_forward_pre_hook(hook) for m in noisy]
    try:
        module(x[:1])
    except _FirstNoiseLayer as found:
        return found.layer
    finally:
        for handle in handles:
            handle.remove()
    return None


class PrefixSharingError(RuntimeError):
    """A shared-prefix forward returned other rows than the passes it ran (the network depends on the batch size)."""


class _PassRepeater:
    """Forward pre-hook of the first noise layer: its input (``inputs`` rows) repeated ``copies`` times.

    Pass-major, as ``x.repeat``, so the layers before it ran once per input. Any other input (the layer called
    again later in the forward, with all the passes' rows, or by keyword) passes unchanged; whether the
    network's passes are then right is what :func:`_sharing_holds` checks before any pass runs.
    """

    def __init__(self) -> None:
        self.copies, self.inputs = 1, 0

    def __call__(self, layer: nn.Module, args: tuple) -> tuple | None:
        h = args[0] if args and isinstance(args[0], Tensor) else None
        if self.copies == 1 or h is None or h.shape[0] != self.inputs:
            return None
        out = h.repeat(self.copies, *([1] * (h.dim() - 1)))
        if h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)  # keep LeNet's NHWC layout
        return (out, *args[1:])


def _shared_forward(module: nn.Module, chunk: Tensor, copies: int, repeater: _PassRepeater) -> Tensor:
    """``module(chunk)`` with the first noise layer's input repeated ``copies`` times: (copies·len(chunk), C)."""
    repeater.copies, repeater.inputs = copies, chunk.shape[0]
    out = module(chunk)
    if out.shape[0] != copies * chunk.shape[0]:
        raise PrefixSharingError(
            f"mc_predict(share_prefix=True): a forward of {chunk.shape[0]} inputs x {copies} passes returned "
            f"{out.shape[0]} rows; pass share_prefix=False for this network."
        )
    return out


@contextlib.contextmanager
def _float64(module: nn.Module, device: torch.device) -> Iterator[Callable[[Tensor], Tensor]]:
    """The module's floating parameters and buffers in float64 meanwhile; yields the same cast for inputs.

    Afterwards every parameter gets its own tensor back and every buffer entry its own object (bit for bit
    and dtype for dtype, also for a module of mixed dtypes). Reduced precision (TF32 matmuls and cuDNN
    convolutions, bf16, fp16) may round a row differently in a forward of another size (another kernel,
    another rounding); in float64 such differences stay far below the sharing check's tolerance. On a device
    without float64 (MPS) the module is left as it is.
    """
    if device.type not in ("cpu", "cuda"):
        yield lambda t: t
        return
    params: list[tuple[nn.Parameter, Tensor]] = []
    buffers: list[tuple[nn.Module, str, Tensor]] = []
    try:
        for m in module.modules():
            for p in m._parameters.values():
                if p is not None and p.is_floating_point() and p.dtype != torch.float64:
                    params.append((p, p.data))
                    p.data = p.data.double()
            for name, b in m._buffers.items():
                if b is not None and b.is_floating_point() and b.dtype != torch.float64:
                    buffers.append((m, name, b))
                    m._buffers[name] = b.double()
        yield lambda t: t.double() if t.is_floating_point() else t
    finally:
        for p, data in params:
            p.data = data
        for m, name, b in buffers:
            m._buffers[name] = b


def _sharing_holds(module: nn.Module, x: Tensor, repeater: _PassRepeater, rows: int) -> bool:
    """Whether sharing the prefix gives this network's passes: the same outputs from the same random draws.

    A few tiny forwards (1 input x 2 passes, and 2 inputs x 3 passes when there are 2, fewer passes when
    ``rows``, the forwards' row limit, is smaller), each run shared and with the inputs repeated up front, from
    the same random state; the caller's random state is left as it was. When they disagree in the module's own
    precision, they run again in float64 (:func:`_float64`), which decides: reduced precision (TF32, bf16, fp16)
    may round a row differently in a forward of another size, which is not a difference of structure.
    A network that feeds a second noise layer from before the first, or uses a tensor from before it after
    it, draws or combines its noise differently when shared, and so fails (or raises, which counts as failing).
    """
    if _outputs_agree(module, x, repeater, rows):
        return True
    with _float64(module, x.device) as cast:
        return _outputs_agree(module, cast(x[:2]), repeater, rows)


def _outputs_agree(module: nn.Module, x: Tensor, repeater: _PassRepeater, rows: int) -> bool:
    """The probe forwards of :func:`_sharing_holds`, shared and not, in the dtypes of ``module`` and ``x``."""
    device = x.device
    devices = [device] if device.type == "cuda" else []
    for n, k in ((1, min(2, rows)), (2, min(3, rows // 2))):
        if n > x.shape[0] or k < 2:  # rows < 2: one row per forward, nothing is ever repeated
            continue
        probe, outs = x[:n], []
        for shared in (True, False):
            with torch.random.fork_rng(devices=devices):
                try:
                    if shared:
                        outs.append(_shared_forward(module, probe, k, repeater))
                    else:
                        outs.append(module(probe.repeat(k, *([1] * (probe.dim() - 1)))))
                except torch.OutOfMemoryError:
                    raise
                except Exception:  # any failure of a forward here means: do not share
                    return False
                finally:
                    repeater.copies = 1
        if outs[0].shape != outs[1].shape or not torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5):
            return False
    return True


def _run_passes(module: nn.Module, x: Tensor, passes: int, rows: int, acc: PassAccumulator) -> None:
    """Run ``passes`` more passes of all of ``x`` through ``module``, ``rows`` input copies per forward."""
    n, t_end = x.shape[0], acc.passes + passes
    if rows >= n:  # whole passes per forward: the batch repeated k times
        per_forward = rows // n
        for t0 in range(acc.passes, t_end, per_forward):
            k = min(per_forward, t_end - t0)
            batch = x if k == 1 else x.repeat(k, *([1] * (x.dim() - 1)))
            acc.update(t0, 0, module(batch).reshape(k, n, -1))
    else:  # more inputs than rows: slices of one pass per forward
        for t in range(acc.passes, t_end):
            for n0 in range(0, n, rows):
                acc.update(t, n0, module(x[n0 : n0 + rows]).unsqueeze(0))
    acc.passes = t_end


def _run_shared_passes(
    module: nn.Module, x: Tensor, passes: int, rows: int, acc: PassAccumulator, repeater: _PassRepeater
) -> None:
    """:func:`_run_passes` with the layers before the first noise layer run once per input, not per pass.

    Each forward takes a slice of the inputs and as many of the passes as fit in ``rows`` (all of them unless
    ``passes`` > ``rows``); ``repeater`` copies the first noise layer's input once per pass. So the prefix sees
    each input once per call (once per ``rows`` passes beyond that). When all N·passes rows fit in one forward,
    that forward is :func:`_run_passes`'s, with the same random draws.
    """
    n, t_end = x.shape[0], acc.passes + passes
    per_forward = min(passes, rows)  # passes per forward
    inputs = min(n, max(1, rows // per_forward))
    for n0 in range(0, n, inputs):
        chunk = x[n0 : n0 + inputs]
        for t0 in range(acc.passes, t_end, per_forward):
            k = min(per_forward, t_end - t0)
            out = _shared_forward(module, chunk, k, repeater)
            acc.update(t0, n0, out.reshape(k, chunk.shape[0], -1))
    acc.passes = t_end


@contextlib.contextmanager
def pass_runner(module: nn.Module, x: Tensor, share_prefix: bool, rows: int) -> Iterator[Callable[..., None]]:
    """Yield ``run(passes, rows, acc)``, which adds ``passes`` passes of all of ``x`` to ``acc``.

    Args:
        module: the network, already under :func:`~dropout_lab.uncertainty.mc_mode` and ``no_grad``.
        x: the inputs (N, ...), on the module's device.
        share_prefix: share the layers before the first noise layer when the check allows it (else, with a
            warning, and always when False: every pass through the whole net).
        rows: the most rows (input copies) one forward may take; the check's forwards stay within it.
    """
    first = first_noise_layer(module, x) if share_prefix else None
    if first is None:
        yield functools.partial(_run_passes, module, x)
        return
    repeater = _PassRepeater()
    handle = first.register_forward_pre_hook(repeater)
    try:
        if _sharing_holds(module, x, repeater, rows):
            yield functools.partial(_run_shared_passes, module, x, repeater=repeater)
            return
    finally:
        handle.remove()
    warnings.warn(
        "mc_predict: sharing the layers before the first noise layer would change this network's passes (a "
        "second noise layer or a skip connection fed from before it?), so every pass runs through the whole "
        "net; share_prefix=False skips this check",
        stacklevel=4,
    )
    yield functools.partial(_run_passes, module, x)
