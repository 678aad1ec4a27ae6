"""A study's results: mean ± std per cell, Welch's t-tests, tables, figure (its files: :mod:`dropout_lab.study_io`).

The figures themselves are drawn by :mod:`dropout_lab.plots` from the arrays this module builds.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dropout_lab import plots
from dropout_lab.stats import betainc, holm, mean_std, welch_t
from dropout_lab.study_io import CURVE_FIELDS, RESULT_FIELDS, append_rows, read_rows, read_scalars

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from dropout_lab.studies import Study

__all__ = [
    "CURVE_FIELDS", "RESULT_FIELDS", "CellStats", "append_rows", "betainc", "holm", "mean_std", "read_rows",
    "read_scalars", "summarize", "welch_t", "write_report",
]  # fmt: skip

ALPHA = 0.05
Rows = list[dict[str, str]]
POPULATION_NOTES = "population.json"  # written by ``study --population`` (dropout_lab.study_population)


def format_value(value: Any, key: str = "") -> str:
    """A short, folder-safe text for an override value: ``[0.1, 0.5]`` → ``0.1,0.5``; a config path → its stem."""
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, (bool, float)) or value is None:
        return f"{value:g}" if isinstance(value, float) else str(value).lower()
    if isinstance(value, dict):
        return format_value(value.get("class_path", "dict"))
    text = str(value)
    if key == "config":
        return Path(text).stem
    return text.rsplit(".", 1)[-1] if re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*", text) else text


def short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key shares (``model.init_args.dropouts`` → ``dropouts``)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out[key] = suffix
    return out


@dataclass
class CellStats:
    """One cell's runs: test accuracies, best validation accuracies and final train − val gaps (one per seed)."""

    name: str
    overrides: dict
    seeds: list[int]
    accs: list[float]
    vals: list[float]
    gaps: list[float]
    seconds: float


def summarize(study: Study, rows: Rows) -> dict[str, CellStats]:
    """The finished runs of ``study``'s cells and seeds (other rows are ignored), in the study's cell order."""
    stats: dict[str, CellStats] = {}
    by_cell = {c.name: c for c in study.cells}
    for row in rows:
        cell, seed = row["cell"], int(row["seed"])
        if cell not in by_cell or seed not in study.seeds:
            continue
        s = stats.setdefault(cell, CellStats(cell, by_cell[cell].overrides, [], [], [], [], 0.0))
        s.seeds.append(seed)
        s.accs.append(float(row["test_acc"]))
        s.vals.append(float(row["best_val_acc"]))
        s.gaps.append(float(row["gap"]))
        s.seconds += float(row["seconds"])
    return {c.name: stats[c.name] for c in study.cells if c.name in stats}


def _pm(values: Sequence[float], scale: float = 100.0) -> str:
    mean, std = mean_std(values)
    return f"{scale * mean:.2f} ± {scale * std:.2f}" if len(values) > 1 else f"{scale * mean:.2f} ± —"  # n = 1


def _p(p: float) -> str:
    return "–" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _mark(p: float) -> str:
    return "–" if math.isnan(p) else "**yes**" if p < ALPHA else "no"


def _baseline_tests(study: Study, stats: dict[str, CellStats]) -> dict[str, float]:
    """Welch's p of every cell against the baseline (NaN where either side has fewer than two seeds)."""
    base = stats.get(study.baseline)
    return {n: welch_t(s.accs, base.accs)[2] for n, s in stats.items() if base and n != study.baseline}


def tables(study: Study, stats: dict[str, CellStats]) -> str:
    """The markdown tables: every cell against the baseline, then the study's ``compare`` pairs."""
    base = stats.get(study.baseline)
    tests = _baseline_tests(study, stats)
    adjusted = dict(zip(tests, holm(list(tests.values())), strict=True)) if tests else {}
    lines = [
        f"| cell | test acc % | best val acc % | train − val gap % | n | Δ test vs {study.baseline} (points) | "
        f"p (Welch) | p (Holm) | p < {ALPHA} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        if name == study.baseline or base is None:
            lines.append(
                f"| **{name}** (baseline) | {_pm(s.accs)} | {_pm(s.vals)} | {_pm(s.gaps)} | {len(s.seeds)} | | | | |"
            )
            continue
        delta = 100 * (mean_std(s.accs)[0] - mean_std(base.accs)[0])
        p = tests[name]
        cols = [name, _pm(s.accs), _pm(s.vals), _pm(s.gaps), len(s.seeds), f"{delta:+.2f}", _p(p), _p(adjusted[name])]
        cols.append(_mark(p))
        lines.append("| " + " | ".join(map(str, cols)) + " |")
    pairs = [(a, b) for a, b in study.compare if a in stats and b in stats]
    if pairs:
        lines += ["", f"| A | B | test acc % A | test acc % B | Δ A − B (points) | p (Welch) | p < {ALPHA} |"]
        lines.append("|---|---|---|---|---|---|---|")
        for a, b in pairs:
            delta = 100 * (mean_std(stats[a].accs)[0] - mean_std(stats[b].accs)[0])
            p = welch_t(stats[a].accs, stats[b].accs)[2]
            cols = [a, b, _pm(stats[a].accs), _pm(stats[b].accs), f"{delta:+.2f}", _p(p), _mark(p)]
            lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def series(curves: Rows, tag: str, cells: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per cell, the steps and the ``tag`` values of every seed (seeds × points), cut to the shortest seed."""
    found: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in curves:
        if row["tag"] == tag and row["cell"] in cells:
            found[row["cell"]][row["seed"]].append((int(row["step"]), float(row["value"])))
    out = {}
    for cell in cells:
        runs = [sorted(dict(points).items()) for points in found.get(cell, {}).values()]
        if runs:
            n = min(len(r) for r in runs)
            out[cell] = (np.array([s for s, _ in runs[0][:n]]), np.array([[v for _, v in r[:n]] for r in runs]))
    return out


def _per_epoch(found: dict[str, tuple[np.ndarray, np.ndarray]], scale: float = 1.0, offset: float = 0.0) -> dict:
    """``series`` of a once-per-epoch tag against the epoch number 1, 2, …, values scaled (``offset + scale·v``)."""
    return {n: (np.arange(1, a.shape[1] + 1), offset + scale * a) for n, (_, a) in found.items()}


def _figure(study: Study, stats: dict[str, CellStats], curves: Rows, rows: Rows) -> Figure:
    names = list(stats)
    title = f"{study.name}: {len(study.seeds)} seeds, mean ± std"
    if study.figure == "bar":
        tests = _baseline_tests(study, stats)
        pvals = [tests.get(n, math.nan) for n in names]
        return plots.plot_study_bars({n: stats[n].accs for n in names}, pvals, study.baseline, title, ALPHA)
    if study.figure == "heatmap":
        keys = list(study.cells[0].overrides)[:2]
        accs = {tuple(format_value(s.overrides[k]) for k in keys): s.accs for s in stats.values()}
        return plots.plot_study_heatmap(accs, [short_keys(keys)[k] for k in keys], title)
    if study.figure == "curves":
        train = _per_epoch(series(curves, "train/acc", names), 100)
        val = _per_epoch(series(curves, "val/acc", names), 100)
        panels = {"train accuracy % (dropout on)": train, "validation accuracy %": val}
        panels["train − validation gap (points)"] = {n: (x, train[n][1] - val[n][1]) for n, (x, _) in val.items()}
        return plots.plot_study_curves(panels, title, xlabel="epoch")
    if study.figure == "test_error":
        panels = {
            "test error %": _per_epoch(series(curves, "test_epoch/acc", names), -100, 100),
            "validation error %": _per_epoch(series(curves, "val/acc", names), -100, 100),
        }
        return plots.plot_study_curves(panels, title, xlabel="epoch")
    per_epoch = {r["cell"]: int(r["steps"]) / int(r["max_epochs"]) for r in rows}
    layers = sorted({r["tag"].split("/", 1)[1] for r in curves if r["tag"].startswith("activation_var/")})
    panels = {}
    for layer in layers:
        for kind, prefix in (("train mode", "activation_var"), ("eval mode", "activation_var_eval")):
            found = series(curves, f"{prefix}/{layer}", names)
            panels[f"{layer}, {kind}"] = {n: (x / per_epoch[n], a) for n, (x, a) in found.items()}
    return plots.plot_study_curves(panels, title, xlabel="epoch", log_y=True, columns=2)


def _init_clause(note: dict) -> str:
    """How a population's members started and drew their masks, against a separate run of their seed."""
    if note.get("init") == "as separate runs":
        return (
            "each member also started from the weights of a separate run of its seed; the members shared one stream "
            "of dropout draws, so a member differs from a separate run in its masks and in float rounding (batched "
            "matmuls), which training amplifies."
        )
    return (  # populations recorded before members were initialized as nn.Linear is under their seed
        "the members were initialized by StackedLinear and shared one stream of dropout draws, so a seed's weights "
        "and masks differ from a separate run's."
    )


def _population_note(study: Study, stats: dict[str, CellStats]) -> str:
    """A sentence per ``study --population`` run recorded in ``<out>/population.json`` whose cells are reported."""
    import json

    path = study.out / POPULATION_NOTES
    notes = json.loads(path.read_text()) if path.exists() else []
    lines = []
    for note in notes:
        cells = [c for c in note["cells"] if c in stats]
        if cells:
            which = "Every cell" if set(cells) == set(stats) else f"Cells {', '.join(cells)}"
            resumed = " in the attempt that resumed and finished it" if note.get("resumed") else ""
            orders = note.get("data_orders")
            if orders == "per seed":
                order = "each member trained on the data order of its seed, as a separate run does, and "
            elif orders == "set by the run's arguments":
                order = "the training orders were set by the run's own --data.shuffle_seeds, and "
            else:
                order = (
                    "the members shared one data order (so the spread over seeds leaves out the data-order "
                    "variance separate runs have: p-values compare the cells on one data order), and "
                )
            lines.append(
                f"{which} × seeds {note['seeds']} ran as the {note['members']} members of one PopulationMLP run "
                f"({note['config']}, {note['seconds']} s wall{resumed}): {order}{_init_clause(note)}\n"
            )
    return "".join(lines)


def write_report(study: Study, rows: Rows, curves: Rows) -> list[Path]:
    """Write ``<out>/<name>.md`` (the tables) and ``<out>/<name>.png`` (the figure); returns their paths."""
    stats = summarize(study, rows)
    if not stats:
        return []
    minutes = sum(s.seconds for s in stats.values()) / 60
    seeds = sorted({seed for s in stats.values() for seed in s.seeds})
    tested = sum(not math.isnan(p) for p in _baseline_tests(study, stats).values())
    untested = " (a comparison with one seed on a side has no test: –)" if tested < max(len(stats) - 1, 0) else ""
    text = (
        f"### {study.name}\n\n{tables(study, stats)}\n\n"
        f"Test accuracy of the best checkpoint (by val/acc); gap = final-epoch train accuracy (dropout on) − "
        f"validation accuracy. p: Welch's two-sided t-test over seeds {seeds}; Holm = adjusted for the "
        f"{tested} comparisons with the baseline{untested}. Runs' summed time: {minutes:.1f} min.\n"
    )
    text += _population_note(study, stats)
    md, png = study.out / f"{study.name}.md", study.out / f"{study.name}.png"
    md.write_text(text)
    _figure(study, stats, curves, rows).savefig(png, dpi=90)
    return [md, png]
