"""MC dropout (Gal & Ghahramani 2016): T stochastic passes at test time, vectorized, and what to read from them.

The one MC switch is :func:`mc_mode`: eval mode for the whole module (batch norm and friends deterministic) with
``mc = True`` on every :class:`~dropout_lab.dropout.StochasticModule`, so the noise layers stay random; on exit it
restores every submodule's train/eval mode and every layer's previous ``mc`` flag. That is what survives Lightning
putting the model in eval mode for ``predict``/``test``: call :func:`mc_predict` from inside a step.

:func:`mc_predict` repeats the batch T times and runs the copies through the net in chunks of bounded size (a
Python loop of T forwards, :func:`mc_loop_predict`, is the reference), accumulating sums of p, p² and p·log p, so
memory does not grow with T unless the samples are asked for. Summaries: predictive mean, predictive entropy
H[E p], expected entropy E H[p], their difference the mutual information (BALD), per-class variance. Also here:
calibration (accuracy, NLL, Brier, ECE, reliability bins), accuracy/NLL/entropy against T, the rotated-image
experiment (their figures are in :mod:`dropout_lab.plots`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from dropout_lab.calibration import calibration_metrics, entropy
from dropout_lab.dropout import DropConnectLinear, StochasticModule, set_mc
from dropout_lab.mc_results import MCResult, _Accumulator, summarize_logits

__all__ = [
    "CPU_MAX_ROWS",
    "MAX_ROWS",
    "MEMORY_BUDGET",
    "MCResult",
    "PrefixSharingError",
    "deterministic_predict",
    "entropy",
    "first_noise_layer",
    "mc_loop_predict",
    "mc_mode",
    "mc_predict",
    "summaries_vs_T",
    "summarize_logits",
]

MAX_ROWS = 65_536
"""Most rows (input copies) one automatic-size forward of :func:`mc_predict` sees on an accelerator."""
CPU_MAX_ROWS = 16_384
"""The same cap on the CPU, where larger chunks only add copies and cache misses (the d2l MLP's time per row
is flat up to ~16k rows per forward and grows beyond)."""
MEMORY_BUDGET = 2**26
"""Default budget, in tensor elements (x 4 bytes for float32), of the largest per-layer tensors of one forward."""
_METRICS = ("accuracy", "nll", "brier", "ece", "entropy", "mutual_information")


# ---------------------------------------------------------------------------------------------- the MC switch
@contextlib.contextmanager
def _preserved_state(module: nn.Module) -> Iterator[None]:
    """Restore, on exit (also after an exception), each submodule's mode and each noise layer's settings."""
    modes = [(m, m.training) for m in module.modules()]
    flags = [(m, m.mc) for m in module.modules() if isinstance(m, StochasticModule)]
    dropconnect = [(m, m.per_sample, m.last_mask) for m in module.modules() if isinstance(m, DropConnectLinear)]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for m, mc in flags:
            m.mc = mc
        for m, per_sample, last_mask in dropconnect:
            m.per_sample, m.last_mask = per_sample, last_mask


@contextlib.contextmanager
def mc_mode(module: nn.Module, per_sample_dropconnect: bool = False) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode with every stochastic layer random (``mc = True``); restore all on exit.

    On exit, also when the body raises, every submodule gets back its own train/eval mode (mixed modes too),
    every :class:`~dropout_lab.dropout.StochasticModule` its previous ``mc`` flag, and every
    :class:`~dropout_lab.dropout.DropConnectLinear` its ``per_sample`` flag and ``last_mask``.

    Args:
        module: the network or LightningModule.
        per_sample_dropconnect: also set ``per_sample = True`` on every DropConnect layer, so each row of a
            batch gets its own weight mask (needed when one batch holds several MC passes of the same input).

    Yields:
        ``module`` itself.
    """
    with _preserved_state(module):
        module.eval()
        set_mc(module, True)
        if per_sample_dropconnect:
            for m in module.modules():
                if isinstance(m, DropConnectLinear):
                    m.per_sample = True
        yield module


# ---------------------------------------------------------------------------------------------- MC passes
def _check_passes(T: int) -> int:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T (the number of MC passes) must be a positive integer, got {T!r}")
    return T


def _on_module_device(module: nn.Module, x: Tensor) -> Tensor:
    param = next(module.parameters(), None)
    return x if param is None else x.to(param.device)


def _rows_per_forward(module: nn.Module, x: Tensor, memory_budget: int, max_rows: int | None) -> int:
    """Rows per forward so that the largest layer's input + output (or DropConnect masks) fit the budget.

    Measured with forward hooks on a one-row probe forward; a per-sample DropConnect layer counts three
    (rows, out, in) tensors per row (uniform draws, keep mask, masked weights).
    """
    per_row = x[:1].numel()

    def hook(m: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal per_row
        size = sum(t.numel() for t in (*inputs, output) if isinstance(t, Tensor))
        if isinstance(m, DropConnectLinear) and m.stochastic and m.per_sample:
            size += 3 * m.weight.numel()
        per_row = max(per_row, size)

    leaves = [m for m in module.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        module(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    if max_rows is None:
        max_rows = CPU_MAX_ROWS if x.device.type == "cpu" else MAX_ROWS
    return max(1, min(max_rows, memory_budget // per_row))


class _FirstNoiseLayer(Exception):
    """Raised by the probe's pre-hook to stop the forward at the first noise layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def first_noise_layer(module: nn.Module, x: Tensor) -> nn.Module | None:
    """The first layer, in the order a forward of ``x`` calls them, that draws noise (a stochastic layer).

    Found with a forward of ``x[:1]`` that stops at that layer's input, so no random number is drawn; call it
    under :func:`mc_mode` (or with the flags the passes will use). None when no layer draws noise.
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


def _sharing_holds(module: nn.Module, x: Tensor, repeater: _PassRepeater, rows: int) -> bool:
    """Whether sharing the prefix gives this network's passes: the same outputs from the same random draws.

    A few tiny forwards (1 input x 2 passes, and 2 inputs x 3 passes when there are 2; none larger than
    ``rows``, the forwards' row limit), each run shared and with the inputs repeated up front, from the same
    random state; the caller's random state is left as it was.
    A network that feeds a second noise layer from before the first, or uses a tensor from before it after
    it, draws or combines its noise differently when shared, and so fails (or raises, which counts as failing).
    """
    device = x.device
    devices = [device] if device.type == "cuda" else []
    for n, k in ((1, 2), (2, 3)):
        if n > x.shape[0] or n * k > rows:  # rows < 2: one row per forward, nothing is ever repeated
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


def _run_passes(module: nn.Module, x: Tensor, passes: int, rows: int, acc: _Accumulator) -> None:
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
    module: nn.Module, x: Tensor, passes: int, rows: int, acc: _Accumulator, repeater: _PassRepeater
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
def _pass_runner(module: nn.Module, x: Tensor, share_prefix: bool, rows: int) -> Iterator[Callable[..., None]]:
    """``run(passes, rows, acc)``: :func:`_run_shared_passes` when sharing applies, else :func:`_run_passes`."""
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


def mc_predict(
    module: nn.Module,
    x: Tensor,
    T: int,
    chunk_size: int | None = None,
    return_samples: bool = False,
    *,
    max_rows: int | None = None,
    memory_budget: int = MEMORY_BUDGET,
    share_prefix: bool = True,
) -> MCResult:
    """T stochastic passes over ``x`` in few, large forwards: the batch repeated, each copy its own noise.

    The T·N rows (pass-major) go through the net ``chunk_size`` rows at a time under ``torch.no_grad()`` and
    :func:`mc_mode`; DropConnect layers switch to one weight mask per row meanwhile, so no two passes share
    a mask. Summaries are accumulated chunk by chunk: without ``return_samples`` memory is one chunk's
    activations, O(N·C) sums and at most ~1M buffered logits, whatever T. Modes and flags are restored afterwards.

    The layers before the first noise layer are the same in every pass, so by default (``share_prefix``) they
    run on the inputs only, and the first noise layer's input is repeated (a forward pre-hook); with more
    inputs than rows per forward, each forward takes a slice of the inputs for many passes, so that prefix runs
    about once per input instead of once per pass (once per ``rows`` passes when T is larger). In the d2l MLP
    the prefix (784 → 256) is 3/4 of the arithmetic. Before the passes, a few tiny forwards check that sharing
    gives the network's own passes (the same outputs from the same random draws, the caller's random state
    untouched); a network for which it does not (a second noise layer, or a skip connection, fed from before
    the first noise layer) gets a warning and runs every pass through the whole net. It needs rows that are
    independent, and its only randomness in noise layers (:class:`~dropout_lab.dropout.StochasticModule`):
    random draws made elsewhere before the first noise layer (``torch.randn_like`` in a ``forward``) would be
    shared by the passes unnoticed. Every classifier and regressor of this package shares (``PopulationMLP``,
    whose activations are (K, B, F), has no MC passes).

    Args:
        module: a network or LightningModule mapping (B, ...) inputs to (B, C) logits.
        x: inputs (N, ...), moved to the module's device.
        T: number of stochastic passes.
        chunk_size: rows (input copies) per forward; None = automatic: ``max_rows``, lowered so that the
            largest layer tensors of one forward (measured on a one-row probe) stay within ``memory_budget``.
        return_samples: also return the per-pass ``probs`` and ``logits`` (T, N, C).
        max_rows: cap of the automatic chunk size; None = 65 536 rows (:data:`MAX_ROWS`) on an accelerator,
            16 384 (:data:`CPU_MAX_ROWS`) on the CPU.
        memory_budget: elements (float32: 4 bytes each) allowed per layer tensor of one forward in the
            automatic chunk size; DropConnect masks count rows × out × in (default 2**26, 256 MiB).
        share_prefix: run the layers before the first noise layer once per input (and forward), not once per
            pass; False = every pass through the whole net (the same distribution, other random draws when
            the inputs do not fit one forward).

    Returns:
        The summaries, on the module's device.
    """
    T = _check_passes(T)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows (or None for automatic), got {chunk_size}")
    x = _on_module_device(module, x)
    with torch.no_grad(), mc_mode(module, per_sample_dropconnect=True):
        rows = chunk_size or _rows_per_forward(module, x, memory_budget, max_rows)
        acc = _Accumulator(x.shape[0], T if return_samples else None)
        with _pass_runner(module, x, share_prefix, rows) as run:
            run(T, rows, acc)
        return acc.result()


def mc_loop_predict(module: nn.Module, x: Tensor, T: int, return_samples: bool = False) -> MCResult:
    """The reference: a Python loop of T forwards of the whole of ``x`` under :func:`mc_mode`.

    DropConnect keeps its own setting (usually one weight mask per forward = per pass, shared by the inputs of
    that pass; the per-input statistics are the same as with per-row masks).

    Args:
        module: a network or LightningModule mapping (B, ...) inputs to (B, C) logits.
        x: inputs (N, ...), moved to the module's device.
        T: number of stochastic passes.
        return_samples: also return the per-pass ``probs`` and ``logits`` (T, N, C).
    """
    T = _check_passes(T)
    x = _on_module_device(module, x)
    with torch.no_grad(), mc_mode(module):
        logits = torch.stack([module(x) for _ in range(T)])
    return summarize_logits(logits, return_samples)


def deterministic_predict(module: nn.Module, x: Tensor, chunk_size: int | None = None) -> Tensor:
    """Class probabilities (N, C) of the deterministic net: eval mode, ``mc`` off (weight scaling).

    Inverted dropout needs no rescaling at test time, so this is the standard inference of a dropout net.
    Modes and flags are restored afterwards.

    Args:
        module: a network or LightningModule mapping (B, ...) inputs to (B, C) logits.
        x: inputs (N, ...), moved to the module's device.
        chunk_size: rows per forward; None = as in :func:`mc_predict`.
    """
    x = _on_module_device(module, x)
    with torch.no_grad(), _preserved_state(module):
        module.eval()
        set_mc(module, False)
        rows = chunk_size or _rows_per_forward(module, x, MEMORY_BUDGET, None)
        return torch.cat([module(chunk).softmax(dim=-1) for chunk in x.split(rows)])


# ---------------------------------------------------------------------------------------------- choosing T
def summaries_vs_T(
    module: nn.Module,
    x: Tensor,
    targets: Tensor,
    Ts: Sequence[int] = (1, 2, 5, 10, 20, 50, 100),
    repeats: int = 5,
    chunk_size: int | None = None,
    share_prefix: bool = True,
) -> list[dict[str, float]]:
    """Accuracy, NLL, Brier, ECE, mean predictive entropy and mean MI of MC dropout against T.

    Each repeat is an independent MC run whose summaries are read after its first T passes, for each T in
    ``Ts`` (one run of max(Ts) passes, so the curve of one repeat is a running estimate). The mean and the
    standard error over the repeats show where more passes stop paying.

    Args:
        module: a network or LightningModule mapping (B, ...) inputs to (B, C) logits.
        x: inputs (N, ...).
        targets: (N,) true classes.
        Ts: numbers of passes to report.
        repeats: independent MC runs (the standard error is NaN with one).
        chunk_size: rows per forward; None = as in :func:`mc_predict`.
        share_prefix: as in :func:`mc_predict`.

    Returns:
        One row per T (ascending): ``T``, then ``<metric>_mean`` and ``<metric>_se`` for each of accuracy,
        nll, brier, ece, entropy (mean predictive entropy) and mutual_information.
    """
    Ts = sorted({_check_passes(int(t)) for t in Ts})
    x = _on_module_device(module, x)
    runs: dict[int, list[dict[str, float]]] = {t: [] for t in Ts}
    with torch.no_grad(), mc_mode(module, per_sample_dropconnect=True):
        rows = chunk_size or _rows_per_forward(module, x, MEMORY_BUDGET, None)
        with _pass_runner(module, x, share_prefix, rows) as run:
            for _ in range(repeats):
                acc = _Accumulator(x.shape[0])
                for t in Ts:
                    run(t - acc.passes, rows, acc)
                    result = acc.result()
                    metrics = calibration_metrics(result.mean_probs, targets)
                    metrics["mutual_information"] = result.mutual_information.double().mean().item()
                    runs[t].append(metrics)
    table = []
    for t in Ts:
        row: dict[str, float] = {"T": t}
        for name in _METRICS:
            values = torch.tensor([r[name] for r in runs[t]], dtype=torch.float64)
            row[f"{name}_mean"] = values.mean().item()
            row[f"{name}_se"] = (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else math.nan
        table.append(row)
    return table
