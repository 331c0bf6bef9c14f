"""Figures of the continual-learning report: matrices, perplexity curves, run comparisons.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so it
is safe in training processes and on machines without a display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from train import cl_metrics


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _array(matrix: Sequence[Sequence[float | None]]) -> np.ndarray:
    return np.array(
        [[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float
    ).reshape(len(matrix), -1)


def plot_matrix(
    path: str | Path,
    matrix: Sequence[Sequence[float | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str,
    lower_is_better: bool = False,
    log_scale: bool = False,
) -> Path:
    """Heatmap of R[row][col] with every value written in its cell; missing values blank."""
    data = _array(matrix)
    fig = Figure(
        figsize=(1.2 + 1.1 * max(len(col_labels), 1), 1.0 + 0.55 * max(len(row_labels), 1))
    )
    ax = fig.add_subplot()
    finite = data[np.isfinite(data)]
    cmap = "viridis_r" if lower_is_better else "viridis"
    norm = None
    if log_scale and finite.size and finite.min() > 0:
        norm = LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * 1.0001))
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels), rotation=30, ha="right")
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after phase")
    ax.set_title(title)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                v = data[i, j]
                text = f"{v:.3g}" if abs(v) >= 100 else f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"
                r, g, b, _ = im.cmap(im.norm(v))
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, text, ha="center", va="center", color=ink, fontsize=8)
    return _save(fig, path)


def plot_ppl_curves(
    path: str | Path, rows: Sequence[Mapping[str, Any]], phase_names: Sequence[str] = ()
) -> Path:
    """Perplexity of every domain over steps; dashed vertical lines at phase ends."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    # a resumed run may evaluate a step twice: the later row wins
    ordered = sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])
    domains: dict[str, None] = {}
    for r in ordered:
        for d in r.get("ppl", {}):
            domains.setdefault(d, None)
    for d in domains:
        pts = [(r["step"], r["ppl"][d]) for r in ordered if r.get("ppl", {}).get(d) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", markersize=3, label=d)
    ends: dict[int, int] = {}
    for r in ordered:
        if r.get("phase_end") and r.get("phase_index", -1) >= 0:
            ends[r["phase_index"]] = r["step"]
    for idx, step in sorted(ends.items()):
        ax.axvline(step, color="grey", linestyle="--", linewidth=1)
        name = phase_names[idx] if idx < len(phase_names) else str(idx)
        ax.text(
            step,
            1.0,
            f" end {name}",
            transform=ax.get_xaxis_transform(),
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
            color="grey",
        )
    if any(v is not None and v > 0 for r in ordered for v in r.get("ppl", {}).values()):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Held-out perplexity per domain")
    if domains:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_report(
    report: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], out_dir: str | Path
) -> list[Path]:
    """All report figures: cl_matrix_ppl.png, cl_matrix_acc.png (with tasks), ppl_curves.png."""
    out_dir = Path(out_dir)
    phases = list(report["phases"])
    written = []

    def with_initial(kind: str) -> tuple[list[list[float | None]], list[str]]:
        matrix = list(report[kind]["matrix"])
        labels = list(phases)
        if report[kind].get("initial") is not None:
            matrix = [report[kind]["initial"], *matrix]
            labels = [cl_metrics.INITIAL_PHASE, *labels]
        return matrix, labels

    matrices = [  # (report key, columns, file, title, plot options)
        ("ppl", "domains", "cl_matrix_ppl.png", "Perplexity",
         {"lower_is_better": True, "log_scale": True}),
        ("acc", "tasks", "cl_matrix_acc.png", "Accuracy", {}),
    ]  # fmt: skip
    for kind, columns, name, what, options in matrices:
        if report[columns]:
            m, labels = with_initial(kind)
            title = f"{what} after each phase"
            written.append(
                plot_matrix(out_dir / name, m, labels, report[columns], title=title, **options)
            )
    written.append(plot_ppl_curves(out_dir / "ppl_curves.png", rows, phases))
    return written


def plot_compare(path: str | Path, reports: Mapping[str, Mapping[str, Any]]) -> Path:
    """Grouped bars per metric, one bar per run: average ppl, BWT, FWT, task accuracies."""
    names = list(reports)
    rows = [
        (m, v)
        for m, v in cl_metrics.compare_rows(reports)
        if not m.startswith("ppl ") or "average" in m or "WT" in m
    ]
    rows = [(m, v) for m, v in rows if not m.startswith("acc_norm ") or "average" in m]
    rows = [(m, v) for m, v in rows if any(x is not None for x in v)]
    ncols = min(3, max(len(rows), 1))
    nrows = max(math.ceil(len(rows) / ncols), 1)
    fig = Figure(figsize=(4 * ncols, 3 * nrows))
    colors = [f"C{i}" for i in range(len(names))]
    for k, (metric, values) in enumerate(rows):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ys = [np.nan if v is None else v for v in values]
        ax.bar(range(len(names)), ys, color=colors)
        ax.set_xticks(range(len(names)), labels=names, rotation=20, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(metric, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _tab20(i: int) -> tuple[float, ...]:
    from matplotlib import colormaps

    return tuple(colormaps["tab20"](i % 20))


def plot_forgetting_bands(
    path: str | Path,
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    phases: Sequence[str],
    panels: Sequence[tuple[str, str]],
) -> Path:
    """One panel per ``(metric template, title)``: the metric ``template.format(phase)`` over
    ``phases``, one line per variant (mean over its runs), a band of ± one standard
    deviation where it has several seeds. ``runs[variant]`` are the runs' summaries."""
    fig = Figure(figsize=(5.2 * len(panels), 4.6))
    for k, (template, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for i, (variant, summaries) in enumerate(runs.items()):
            ys = np.array([[s[template.format(p)] for p in phases] for s in summaries], float)
            mean = ys.mean(axis=0)
            # 10 colours for up to 10 variants; beyond that, tab20 (no two lines alike).
            color = f"C{i}" if len(runs) <= 10 else _tab20(i)
            style = "-" if len(summaries) > 1 else ":"
            ax.plot(phases, mean, style, marker="o", markersize=3, color=color, label=variant)
            if len(summaries) > 1:
                sd = ys.std(axis=0, ddof=1)
                ax.fill_between(phases, mean - sd, mean + sd, color=color, alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("after phase")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.axes[0].set_ylabel("held-out perplexity (log; band: ± 1 std over seeds)")
    fig.axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_tradeoff(
    path: str | Path,
    groups: Mapping[str, Sequence[tuple[str, Mapping[str, Mapping[str, Any]]]]],
    *,
    x: str,
    y: str,
    xlabel: str,
    ylabel: str,
) -> Path:
    """Points ``(mean of metric x, mean of metric y)`` with ± std error bars, one connected
    series per group, each point labelled. ``groups[name] = [(label, aggregate), ...]`` with
    ``aggregate[metric] = {"mean", "std", "n"}`` (train/experiment.py ``aggregate``)."""
    fig = Figure(figsize=(7.5, 5.5))
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(groups.items()):
        pts = [(lab, a) for lab, a in points if x in a and y in a]
        if not pts:
            continue
        xs = [a[x]["mean"] for _, a in pts]
        ys = [a[y]["mean"] for _, a in pts]
        xerr = [a[x]["std"] or 0.0 for _, a in pts]
        yerr = [a[y]["std"] or 0.0 for _, a in pts]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", linestyle="-" if len(pts) > 1
                    else "none", color=f"C{i % 10}", capsize=3, label=name)  # fmt: skip
        for (lab, _), xv, yv in zip(pts, xs, ys):
            ax.annotate(lab, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title("Forgetting against learning (lower left is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
