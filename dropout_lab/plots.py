"""Matplotlib figures shared by the callbacks and the studies (Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from dropout_lab.calibration import ReliabilityBins
    from dropout_lab.rotated import RotatedResult

__all__ = [
    "History",
    "plot_activation_variance",
    "plot_reliability",
    "plot_rotated",
    "plot_summaries_vs_T",
    "render_rgba",
]

History = Mapping[str, Sequence[tuple[int, float]]]
"""``{layer name: [(global step, value), ...]}``, as kept by ``ActivationVarianceMonitor.history``."""


def plot_activation_variance(
    history: History,
    eval_history: History | None = None,
    title: str = "Activation variance",
    log_y: bool | None = None,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """Variance of each watched layer's activations against the training step, one color per layer.

    Args:
        history: per layer, ``(step, variance)`` measured on training batches (train mode): solid lines.
        eval_history: per layer, ``(step, variance)`` measured on the fixed validation batch in eval mode:
            dashed lines with markers, in the same color as the layer's training line.
        title: the axes title.
        log_y: logarithmic y axis; null = logarithmic when every value is positive (variances of different
            layers often differ by orders of magnitude).
        labels: legend text per layer name (default: the name itself).

    Returns:
        A new ``matplotlib.figure.Figure`` (not registered with pyplot; nothing to close).
    """
    eval_history = eval_history or {}
    labels = labels or {}
    layers = list(dict.fromkeys([*history, *eval_history]))
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    values: list[float] = []
    for i, layer in enumerate(layers):
        color = colors[i % len(colors)]
        lines = ((history.get(layer, ()), "-", ""), (eval_history.get(layer, ()), "--o", " (eval)"))
        for points, style, suffix in lines:
            if not points:
                continue
            steps, ys = zip(*points, strict=True)
            values.extend(ys)
            ax.plot(steps, ys, style, color=color, label=labels.get(layer, layer) + suffix, markersize=3, linewidth=1.4)
    if log_y is None:
        log_y = bool(values) and min(values) > 0
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("per-unit variance over the batch (mean over units)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if layers:
        fig.legend(fontsize="small", loc="outside right upper")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    return fig


def render_rgba(fig: Figure) -> np.ndarray:
    """Draw ``fig`` once with Agg and return its pixels, uint8 (height, width, 4).

    One rendering serves both the PNG file (``matplotlib.image.imsave``) and TensorBoard (``add_image``).
    """
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


_LABELS = {
    "accuracy": "accuracy",
    "nll": "NLL (nats)",
    "brier": "Brier score",
    "ece": "ECE",
    "entropy": "mean predictive entropy (nats)",
    "mutual_information": "mean mutual information (nats)",
}


def plot_summaries_vs_T(
    rows: Sequence[dict[str, float]],
    deterministic: dict[str, float] | None = None,
    metrics: Sequence[str] = ("accuracy", "nll", "entropy"),
) -> Figure:
    """One panel per metric against T (log axis), mean ± standard error over the repeats.

    Args:
        rows: the output of :func:`dropout_lab.uncertainty.summaries_vs_T`.
        deterministic: ``calibration_metrics`` of the deterministic net, drawn as dashed lines.
        metrics: which metrics to draw.
    """
    fig = Figure(figsize=(4.2 * len(metrics), 3.4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    ts = [row["T"] for row in rows]
    for ax, name in zip(axes, metrics, strict=True):
        means = [row[f"{name}_mean"] for row in rows]
        ses = [0.0 if math.isnan(row[f"{name}_se"]) else row[f"{name}_se"] for row in rows]
        ax.errorbar(ts, means, yerr=ses, marker="o", capsize=3, label="MC dropout")
        if deterministic is not None and name in deterministic:
            ax.axhline(deterministic[name], color="k", linestyle="--", linewidth=1, label="weight scaling")
        ax.set_xscale("log")
        ax.set_xlabel("T (MC passes)")
        ax.set_ylabel(_LABELS.get(name, name))
        ax.grid(alpha=0.3)
    axes[0].legend()
    return fig


def plot_reliability(
    det_bins: ReliabilityBins,
    mc_bins: ReliabilityBins,
    labels: tuple[str, str] = ("deterministic (weight scaling)", "MC dropout"),
) -> Figure:
    """Reliability diagrams side by side: accuracy per confidence bin against the diagonal, with the gaps.

    Args:
        det_bins: :func:`dropout_lab.calibration.reliability_bins` of the deterministic predictions.
        mc_bins: :func:`dropout_lab.calibration.reliability_bins` of the MC predictive mean.
        labels: panel titles.
    """
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, bins, label in zip(axes, (det_bins, mc_bins), labels, strict=True):
        edges = bins.edges.numpy()
        width, centers = edges[1:] - edges[:-1], (edges[1:] + edges[:-1]) / 2
        acc, conf = bins.accuracy.nan_to_num(0.0).numpy(), bins.confidence.nan_to_num(0.0).numpy()
        filled = (bins.count > 0).numpy()
        ax.bar(centers[filled], acc[filled], width=width[filled], edgecolor="k", alpha=0.8, label="accuracy")
        ax.bar(
            centers[filled],
            (conf - acc)[filled],
            bottom=acc[filled],
            width=width[filled],
            fill=False,
            edgecolor="tab:red",
            hatch="//",
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{label}\nECE {bins.ece:.4f}")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    return fig


def plot_rotated(result: RotatedResult, max_points: int = 200) -> Figure:
    """The rotated images, then per angle a scatter of the logit samples and of the probability samples.

    Args:
        result: the output of :func:`dropout_lab.rotated.rotated_image_experiment`.
        max_points: samples drawn per angle and class (a random subset when T is larger).
    """
    images, angles = result["images"], result["angles"]
    n_angles, passes = len(angles), result["logits"].shape[0]
    fig = Figure(figsize=(max(8.0, 0.75 * n_angles), 7.5), layout="constrained")
    strip, ax_logits, ax_probs = fig.subplots(3, 1, sharex=True, height_ratios=[1, 2.5, 2.5])
    strip.imshow(torch.cat(list(images[:, 0]), dim=1).numpy(), cmap="gray", extent=(-0.5, n_angles - 0.5, 0, 1))
    strip.set_yticks([])
    strip.set_aspect("auto")
    gen = torch.Generator().manual_seed(0)
    keep = torch.randperm(passes, generator=gen)[:max_points]
    for j, name in enumerate(result["class_names"]):
        xs = torch.arange(n_angles).repeat(len(keep), 1) + 0.5 * (torch.rand(len(keep), n_angles, generator=gen) - 0.5)
        for ax, samples in ((ax_logits, result["logits"]), (ax_probs, result["probs"])):
            ax.scatter(
                xs.flatten(),
                samples[keep, :, j].flatten(),
                s=4,
                alpha=0.25,
                color=f"C{j}",
                label=name if ax is ax_logits else None,
            )
    ax_logits.set_ylabel("softmax input (logit)")
    ax_probs.set(ylabel="softmax output (probability)", ylim=(-0.02, 1.02), xlabel="rotation (degrees)")
    ax_probs.set_xticks(range(n_angles), [f"{a:g}" for a in angles])
    legend = ax_logits.legend(markerscale=3, loc="best")
    for handle in legend.legend_handles:
        handle.set_alpha(1.0)
    for ax in (ax_logits, ax_probs):
        ax.grid(alpha=0.3)
    return fig


def plot_study_bars(accs: Mapping[str, Sequence[float]], pvalues: Sequence[float], baseline: str, title: str,
                    alpha: float = 0.05) -> Figure:  # fmt: skip
    """Test accuracy (%) per study cell: mean bar, ± std error bar, one dot per seed; ``*`` where p < ``alpha``."""
    fig = Figure(figsize=(max(5.0, 1.1 * len(accs) + 1), 4.2), layout="constrained")
    ax = fig.subplots()
    values = [100 * np.asarray(v) for v in accs.values()]
    means, stds = [v.mean() for v in values], [v.std(ddof=1) if len(v) > 1 else 0.0 for v in values]
    colors = ["tab:orange" if name == baseline else "tab:blue" for name in accs]
    ax.bar(range(len(values)), means, yerr=stds, color=colors, alpha=0.6, capsize=4)
    for i, (v, p) in enumerate(zip(values, pvalues, strict=True)):
        ax.plot(np.full(len(v), i), v, "k.", markersize=4)
        if p < alpha:
            ax.annotate("*", (i, v.max()), ha="center", va="bottom", fontsize=14)
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    if finite.size:  # (a study run without its test has no accuracies to show)
        low, high = finite.min(), finite.max()
        ax.set_ylim(low - 0.3 * (high - low + 0.5), high + 0.25 * (high - low + 0.5))
    ax.set_xticks(range(len(values)), list(accs), rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{title}\norange = baseline, * = p < {alpha} vs baseline (Welch)", fontsize="medium")
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def plot_study_heatmap(accs: Mapping[tuple[str, str], Sequence[float]], keys: Sequence[str], title: str) -> Figure:
    """Mean test accuracy (%) over two grid keys (rows: ``keys[0]``, columns: ``keys[1]``), labelled mean ± std."""
    rows = list(dict.fromkeys(r for r, _ in accs))
    cols = list(dict.fromkeys(c for _, c in accs))
    grid = np.full((len(rows), len(cols)), np.nan)
    fig = Figure(figsize=(1.6 * len(cols) + 2.5, 0.8 * len(rows) + 1.8), layout="constrained")
    ax = fig.subplots()
    for (r, c), v in accs.items():
        grid[rows.index(r), cols.index(c)] = 100 * np.mean(v)
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for (r, c), v in accs.items():
        std = 100 * np.std(v, ddof=1) if len(v) > 1 else 0.0
        ax.text(cols.index(c), rows.index(r), f"{100 * np.mean(v):.2f}\n± {std:.2f}", ha="center", va="center",
                color="white" if 100 * np.mean(v) < np.nanmean(grid) else "black", fontsize="small")  # fmt: skip
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(keys[1])
    ax.set_ylabel(keys[0])
    ax.set_title(title, fontsize="medium")
    fig.colorbar(image, ax=ax, label="test accuracy %")
    return fig


def plot_study_curves(panels: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], title: str,
                      xlabel: str = "epoch", log_y: bool = False, columns: int = 3) -> Figure:  # fmt: skip
    """One axes per panel; per cell the mean over seeds (rows of the array) against x, with a ± std band."""
    n = max(len(panels), 1)
    ncols = min(columns, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.6 * ncols + 1.5, 3.4 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    cells = list(dict.fromkeys(c for panel in panels.values() for c in panel))
    for ax, (name, panel) in zip(axes, panels.items(), strict=False):
        for cell, (x, values) in panel.items():
            color = colors[cells.index(cell) % len(colors)]
            mean, std = values.mean(axis=0), values.std(axis=0, ddof=1) if len(values) > 1 else 0 * values[0]
            ax.plot(x, mean, color=color, label=cell, linewidth=1.4)
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if cells:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(len(cells), 4))
    fig.suptitle(title)
    return fig
