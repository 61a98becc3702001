"""The results contract: what `zephyr eval run` writes and what reports and the gate read.

A run is a list of measurements. Each measurement keeps its per-item values keyed by item id, so two models
measured on the same items can be compared pairwise (paired bootstrap), and a subset run (--limit) is still
comparable item by item with a full one."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from zephyr.registry import check_name

RUNS_DIR = "runs"


class Measurement(BaseModel):
    benchmark: str  # arc_easy, arc_challenge, mmlu, sciq, openbookqa, gsm8k, sciq_text, gsm8k_text, rm
    metric: str  # cloze_acc, cloze_acc_norm, letter_acc, letter_acc_server, exact_match_0shot_cot, ...
    split: str
    n: int
    score: float  # mean of `items` (a share in [0, 1] for accuracies)
    items: dict[str, float]  # item id -> value (1.0/0.0 for accuracy)
    groups: dict[str, float] = {}  # e.g. MMLU per subject and the "stem" aggregate
    seconds: float | None = None
    details: dict[str, Any] = {}

    @property
    def key(self) -> str:
        return f"{self.benchmark}/{self.metric}"

    @property
    def suite(self) -> str:
        return suite_of(self.benchmark)


class EvalRun(BaseModel):
    model: str
    parent: str | None = None
    method: str | None = None
    suite: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    limit: int | None = None
    size_bytes: int | None = None
    quantization: dict[str, Any] | None = None  # the checkpoint's quantization_config, if any
    engine: dict[str, Any] = {}  # how it was measured: dtype, max_model_len, versions, server URL
    speed: dict[str, Any] = {}  # throughput/latency figures when recorded (quantization comparisons)
    measurements: list[Measurement] = []

    def get(self, key: str) -> Measurement | None:
        return next((m for m in self.measurements if m.key == key), None)


SUITE_BENCHMARKS = {
    "mcq": ("arc_easy", "arc_challenge", "mmlu", "sciq", "openbookqa"),
    "gsm8k": ("gsm8k",),
    "text": ("sciq_text", "gsm8k_text", "rm"),
}


def suite_of(benchmark: str) -> str:
    return next((suite for suite, names in SUITE_BENCHMARKS.items() if benchmark in names), "other")


def measurement(benchmark: str, metric: str, split: str, items: dict[str, float], **extra: Any) -> Measurement:
    values = list(items.values())
    return Measurement(benchmark=benchmark, metric=metric, split=split, n=len(values),
                       score=float(np.mean(values)) if values else float("nan"), items=items, **extra)


class ResultStore:
    """`<root>/<model>/runs/<suite>-<timestamp>.json` keeps every run; the newest run of each measurement wins."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def folder(self, model: str) -> Path:
        """`<root>/<model>`, for a registry name only (RegistryError otherwise): every path here goes through it."""
        return self.root / check_name(model)

    def save(self, run: EvalRun) -> Path:
        folder = self.folder(run.model) / RUNS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        stamp = run.created_at.strftime("%Y%m%dT%H%M%S%fZ")
        path = folder / f"{run.suite}-{stamp}.json"
        path.write_text(run.model_dump_json(indent=1))
        return path

    def runs(self, model: str) -> list[EvalRun]:
        folder = self.folder(model) / RUNS_DIR
        if not folder.is_dir():
            return []
        runs = [EvalRun.model_validate_json(p.read_text()) for p in folder.glob("*.json")]
        return sorted(runs, key=lambda r: r.created_at)

    def latest(self, model: str) -> EvalRun | None:
        """One merged view of a model: each measurement from the newest run that has it."""
        runs = self.runs(model)
        if not runs:
            return None
        merged: dict[str, Measurement] = {}
        for run in runs:
            for m in run.measurements:
                merged[m.key] = m
        speed: dict[str, Any] = {}
        for run in runs:
            if run.speed:
                # Which measurement it was: speeds compare only within one session (see evals.report).
                speed.pop("session", None)
                speed.update({"measured_at": run.created_at.isoformat(), **run.speed})
        # A run that did not record a field (e.g. a server-only run without a size) does not erase an older value.
        described = {field: next((getattr(r, field) for r in reversed(runs) if getattr(r, field) is not None), None)
                     for field in ("parent", "method", "size_bytes", "quantization")}
        return runs[-1].model_copy(update={"suite": "merged", "measurements": list(merged.values()), "speed": speed,
                                           **described})


def summary(run: EvalRun) -> dict[str, Any]:
    """What the registry manifest records: score and size of each measurement, and where the run lies."""
    return {m.key: {"score": round(m.score, 6), "n": m.n, "split": m.split, "at": run.created_at.isoformat()}
            for m in run.measurements}


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
