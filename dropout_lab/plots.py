"""Matplotlib figures shared by the callbacks and the studies (Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["History", "plot_activation_variance", "render_rgba"]

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
