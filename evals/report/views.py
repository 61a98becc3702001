"""What the report knows about each model (its merged results and registry entry), and how its figures are written."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from evals.gate import fmt_value, stale_served_rows
from evals.results import (
    EvalRun,
    Measurement,
    ResultStore,
    chosen_sources,
    is_share,
    merge_runs,
    method_metric,
    scale_of,
)
from evals.stats import bootstrap_ci
from zephyr.registry import Registry

from .document import MISSING

SERVED_METRIC = method_metric("auto")  # /mcq's default method, through each model's own calibration record


@dataclass
class ModelView:
    name: str
    run: EvalRun | None
    parent: str | None
    method: str | None
    size_bytes: int | None
    quantization: dict[str, Any] | None
    cis: dict[str, tuple[float, float] | None] = field(default_factory=dict)  # key -> CI of the mean
    # served (`auto`) measurements made under another calibration record than the entry holds now
    stale: list[str] = field(default_factory=list)
    # per suite, the --limit of the runs the shown measurements come from (None: whole splits); suites are run apart,
    # so one model's MCQ figures may be whole splits and its text figures the first 300 questions
    limits: dict[str, set[int | None]] = field(default_factory=dict)

    def get(self, key: str) -> Measurement | None:
        return self.run.get(key) if self.run else None

    def ci(self, m: Measurement) -> tuple[float, float] | None:
        if m.key not in self.cis:
            try:
                self.cis[m.key] = bootstrap_ci(list(m.items.values()))
            except ValueError:  # no items, or NaN among them: show the score without an interval
                self.cis[m.key] = None
        return self.cis[m.key]


def collect(store: ResultStore, models: list[str], registry: Registry | None) -> list[ModelView]:
    views = []
    for name in models:
        runs = store.runs(name)
        run = merge_runs(runs)
        limits: dict[str, set[int | None]] = {}
        for _, source in chosen_sources(runs).values():
            limits.setdefault(source.suite, set()).add(source.limit)
        entry = registry.get(name) if registry is not None and registry.exists(name) else None
        manifest = entry.manifest if entry else None
        size = run.size_bytes if run else None
        views.append(
            ModelView(
                name=name,
                run=run,
                parent=(run.parent if run else None) or (manifest.parent if manifest else None),
                method=(run.method if run else None) or (manifest.method if manifest else None),
                size_bytes=size if size is not None else (entry.size_bytes() if entry else None),
                quantization=run.quantization if run else None,
                stale=stale_served_rows(store, name, run, ["mcq"]) if run else [],
                limits=limits,
            )
        )
    return views


def concurrencies(ordered: list[tuple[ModelView, int | None]]) -> list[str]:
    """Every concurrency any of these models' speed records measured, in increasing order."""
    found = {c for v, _ in ordered if v.run for c in v.run.speed.levels()}
    return sorted(found, key=int)


# --- formatting ----------------------------------------------------------------------------------------------


def fmt_size(n: int | float | None) -> str:
    if n is None:
        return MISSING
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_number(x: float) -> str:
    if not math.isfinite(x):
        return MISSING
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_score(m: Measurement, ci: tuple[float, float] | None) -> str:
    share, scale = is_share(m.metric), scale_of(m.metric)
    if not math.isfinite(m.score):
        return MISSING
    text = fmt_value(m.score * scale, share)
    if ci is not None:
        text += f" [{fmt_value(ci[0] * scale, share)}, {fmt_value(ci[1] * scale, share)}]"
    return text


def quant_summary(q: dict[str, Any] | None) -> str:
    if not q:
        return MISSING
    parts = [str(q.get("quant_method", "quantized"))]
    for key in ("format", "bits", "w_bit", "group_size", "q_group_size"):
        if key in q and not isinstance(q[key], dict | list):
            parts.append(f"{key}={q[key]}")
    return " ".join(parts)
