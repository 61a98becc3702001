"""The report's plots: PNG files under out_dir/plots, drawn with matplotlib's object API (imported on use, so a
missing matplotlib is an ImportError the sections turn into a note)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from evals.gate import order_key
from evals.results import is_share, metric_label

from .document import DocFigure
from .views import ModelView, concurrencies

PLOT_FILES = ("accuracy.png", "rm_scores.png", "quantized.png", "calibration.png")
NO_MATPLOTLIB = "matplotlib is not installed, so this report has no plots: `pip install matplotlib`."


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    # The object API with an explicit Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _save(fig: Any, path: Path, caption: str) -> DocFigure:
    fig.savefig(path, format="png", dpi=110)
    return DocFigure(path, caption)


def plot_accuracy(views: list[ModelView], plots: Path) -> DocFigure | None:
    measured = [v for v in views if v.run]
    keys = sorted(
        {(m.benchmark, m.metric) for v in measured for m in v.run.measurements if is_share(m.metric)},
        key=lambda k: order_key(*k),
    )
    if not keys:
        return None
    fig, ax = _figure(min(24.0, 3.0 + len(keys) * (0.35 + 0.18 * len(measured))), 4.5)
    width = 0.8 / len(measured)
    for i, v in enumerate(measured):
        xs, heights, errs = [], [], [[], []]
        for j, (bench, metric) in enumerate(keys):
            m = v.get(f"{bench}/{metric}")
            if m is None or not math.isfinite(m.score):
                continue
            ci = v.ci(m) or (m.score, m.score)
            xs.append(j - 0.4 + width * (i + 0.5))
            heights.append(m.score * 100)
            errs[0].append(max(0.0, (m.score - ci[0]) * 100))
            errs[1].append(max(0.0, (ci[1] - m.score) * 100))
        ax.bar(xs, heights, width, yerr=errs, capsize=2, label=v.name)
    ax.set_xticks(range(len(keys)), [f"{b}\n{metric_label(m)}" for b, m in keys], rotation=45, ha="right",
                  fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("share of questions (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plots / "accuracy.png", "Accuracy per benchmark and metric, with 95% bootstrap CI")


def plot_reliability(curves: list[tuple[str, str, list[dict[str, float]]]], plots: Path) -> DocFigure:
    benches = list(dict.fromkeys(bench for _, bench, _ in curves))
    fig, axes = _figure(3.2 * len(benches) + 0.6, 3.6, ncols=len(benches))
    axes = np.atleast_1d(axes)
    for ax, bench in zip(axes, benches, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for name, b, bins in curves:
            if b == bench:
                ax.plot([x["confidence"] for x in bins], [x["accuracy"] for x in bins], marker="o", markersize=3,
                        label=name)
        ax.set_title(bench, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    return _save(fig, plots / "calibration.png", "Reliability of the served method: accuracy against confidence "
                 "(15 bins; the dotted diagonal is perfect calibration)")


def plot_quantized(ordered: list[tuple[ModelView, int | None]], acc_keys: list[str], plots: Path) -> DocFigure | None:
    levels = concurrencies(ordered)
    # Cloze separates the variants where letter accuracy sits at chance for a small model.
    key = next((k for k in acc_keys if k.endswith("/cloze_acc")), acc_keys[0] if acc_keys else None)
    sized = [(v, m) for v, _ in ordered for m in [v.get(key) if key else None] if m and v.size_bytes]
    if not levels and not sized:
        return None
    fig, (speed_ax, acc_ax) = _figure(11.0, 4.0, ncols=2)
    # One colour per model in both panels; legends, not labels beside the points, which overlap at equal sizes.
    colour = {v.name: f"C{i % 10}" for i, (v, _) in enumerate(ordered)}
    for v, _ in ordered:
        tok = v.run.speed.tok_per_s if v.run else {}
        if tok:
            xs = [int(c) for c in levels if c in tok]
            speed_ax.plot(xs, [tok[str(x)] for x in xs], marker="o", label=v.name, color=colour[v.name])
    speed_ax.set_xscale("log", base=2)
    speed_ax.set_xticks([int(c) for c in levels], levels)
    speed_ax.set_xlabel("concurrent requests")
    speed_ax.set_ylabel("output tokens/s")
    speed_ax.grid(alpha=0.3)
    if levels:
        speed_ax.legend(fontsize=7)
    for v, m in sized:
        ci = v.ci(m) or (m.score, m.score)
        acc_ax.errorbar(v.size_bytes / 1e6, m.score * 100,  # a bound rounded past the score would be a negative bar
                        yerr=[[max(0.0, (m.score - ci[0]) * 100)], [max(0.0, (ci[1] - m.score) * 100)]],
                        fmt="o", capsize=3, color=colour[v.name], label=v.name)
    if sized:
        acc_ax.legend(fontsize=7)
    acc_ax.set_xlabel("size on disk (MB)")
    acc_ax.set_ylabel(f"{key} (%)" if key else "accuracy (%)")
    acc_ax.grid(alpha=0.3)
    return _save(fig, plots / "quantized.png", "Served throughput per concurrency, and accuracy (95% CI) against size")


def plot_rm(data: list[tuple[str, np.ndarray]], plots: Path) -> DocFigure:
    fig, (hist, box) = _figure(11.0, 4.0, ncols=2)
    bins = np.histogram_bin_edges(np.concatenate([x for _, x in data]), bins=30)
    for name, x in data:
        hist.hist(x, bins=bins, histtype="step", linewidth=1.5, label=name)
    hist.set_xlabel("reward-model score")
    hist.set_ylabel("questions")
    hist.legend(fontsize=8)
    box.boxplot([x for _, x in data])
    box.set_xticks(range(1, len(data) + 1), [name for name, _ in data], rotation=30, ha="right", fontsize=8)
    box.set_ylabel("reward-model score")
    return _save(fig, plots / "rm_scores.png", "Reward-model score distribution per model")
