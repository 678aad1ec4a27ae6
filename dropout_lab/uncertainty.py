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
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from dropout_lab.calibration import calibration_metrics, entropy
from dropout_lab.dropconnect import DropConnectLinear
from dropout_lab.dropout import StochasticModule, set_mc
from dropout_lab.mc_passes import PrefixSharingError, first_noise_layer, pass_runner
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
    :class:`~dropout_lab.dropconnect.DropConnectLinear` its ``per_sample`` flag and ``last_mask``.

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
    """``x`` on the module's device, and floating ``x`` in its weights' dtype (a ``bf16-true`` or ``64-true`` net)."""
    param = next(module.parameters(), None)
    if param is None:
        return x
    return x.to(param.device, param.dtype if x.is_floating_point() and param.is_floating_point() else None)


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
        with pass_runner(module, x, share_prefix, rows) as run:
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
        with pass_runner(module, x, share_prefix, rows) as run:
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
