"""The results contract: what `zephyr eval run` (and `loadtest.variants`, speed records) writes and what reports
and the gate read.

A run is a list of measurements. Each measurement keeps its per-item values keyed by item id, so two models
measured on the same items can be compared pairwise (paired bootstrap), and a subset run (--limit) is still
comparable item by item with a full one."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

from offline.benchmarks import MCQ_BENCHMARKS
from zephyr.paths import write_text_atomic
from zephyr.registry import Registry, RegistryEntry, check_name, quantization_config

log = logging.getLogger("zephyr.evals")

RUNS_DIR = "runs"
# Two speed records without session ids pair when saved this close: loadtest.variants saved a session's records
# together at its end, seconds apart, before sessions were named.
SAME_SESSION_SECONDS = 120.0


class Measurement(BaseModel):
    # A measurement of no items scores NaN (a reward model may score one too): written as "NaN", not as JSON's null,
    # which a float refuses on reading, so one such figure made its whole run unreadable.
    model_config = ConfigDict(ser_json_inf_nan="strings")

    benchmark: str  # arc_easy, arc_challenge, mmlu, sciq, openbookqa, gsm8k, sciq_text, gsm8k_text, rm
    metric: str  # cloze_acc, cloze_acc_norm, letter_acc, letter_acc_server, exact_match_0shot_cot, ...
    split: str
    n: int
    score: float  # mean of `items` (a share in [0, 1] for accuracies)
    items: dict[str, float]  # item id -> value (1.0/0.0 for accuracy)
    groups: dict[str, float] = {}  # e.g. MMLU per subject and the "stem" aggregate
    seconds: float | None = None
    details: dict[str, Any] = {}
    # What its figures were computed on: each of data_read(benchmark, metric) -> offline.benchmarks.fingerprint of
    # that whole split as read; the gate and the report pair two measurements only where these agree
    data_digest: dict[str, str] = {}

    @field_validator("score", mode="before")
    @classmethod
    def _nan_written_as_null(cls, value: Any) -> Any:
        return float("nan") if value is None else value  # runs saved before NaN was written as "NaN"

    @field_validator("items", "groups", mode="before")
    @classmethod
    def _nans_written_as_null(cls, values: Any) -> Any:
        if isinstance(values, dict):
            return {k: float("nan") if v is None else v for k, v in values.items()}
        return values

    @property
    def key(self) -> str:
        return f"{self.benchmark}/{self.metric}"

    @property
    def suite(self) -> str:
        return suite_of(self.benchmark)


class SpeedRecord(BaseModel):
    """Served speed and memory of one model, as `loadtest.variants` records it (a run of suite "speed"): medians
    over rounds. Per-concurrency figures are keyed by the number of concurrent requests as a string ("1", "8"),
    as JSON object keys are. Every field is optional: a run that measured no speed holds an empty record, and
    records saved before sessions were named have no `session`."""

    model_config = ConfigDict(extra="allow")  # a figure this model does not name yet is kept, not dropped

    tok_per_s: dict[str, float] = {}  # output tokens per second
    ttft_p50_ms: dict[str, float] = {}
    latency_p50_s: dict[str, float] = {}
    latency_p95_s: dict[str, float] = {}
    rss_peak_bytes: int | None = None  # the server and its engine processes together
    rss_idle_bytes: float | None = None
    cold_start_s: float | None = None
    session: str | None = None  # one loadtest.variants invocation: speeds compare only within one
    measured_at: datetime | None = None  # when the run holding it was saved; set by ResultStore.latest, not saved

    @property
    def recorded(self) -> bool:
        """Whether the record holds anything (every run has one; only speed runs fill it)."""
        return bool(self.saved_form())

    def saved_form(self) -> dict[str, Any]:
        """What a results file holds: the figures that were recorded (nothing for the rest), without the time
        a merged view adds."""
        return self.model_dump(mode="json", exclude_defaults=True, exclude={"measured_at"})

    def levels(self) -> list[str]:
        """The concurrencies measured, in increasing order."""
        return sorted(self.tok_per_s, key=int)

    def same_session(self, other: SpeedRecord) -> bool:
        """Whether two records come from one `loadtest.variants` session: the same session id, or, for records
        from before sessions were named, saved within SAME_SESSION_SECONDS of each other."""
        if self.session and other.session:
            return self.session == other.session
        if self.measured_at is None or other.measured_at is None:
            return False
        try:
            gap = self.measured_at - other.measured_at
        except TypeError:  # one naive, one aware: not comparable
            return False
        return abs(gap.total_seconds()) <= SAME_SESSION_SECONDS


class EvalRun(BaseModel):
    model: str
    # The registry entry's created_at when it was measured: an entry replaced under the same name since (train or
    # quantize --overwrite, remove and import) is another model, and its old runs are not read as this one's.
    model_made_at: datetime | None = None
    parent: str | None = None
    method: str | None = None
    suite: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    limit: int | None = None
    size_bytes: int | None = None
    quantization: dict[str, Any] | None = None  # the checkpoint's quantization_config, if any
    engine: dict[str, Any] = {}  # how it was measured: dtype, max_model_len, versions, server URL
    # benchmark -> where its items were read: a `--data` file, folder or hub name, else ZEPHYR_DATA_DIR
    data: dict[str, str] = {}
    speed: SpeedRecord = Field(default_factory=SpeedRecord)  # filled by loadtest.variants (quantization comparisons)
    measurements: list[Measurement] = []

    @classmethod
    def of_entry(cls, entry: RegistryEntry, suite: str, **fields: Any) -> EvalRun:
        """A run of a registry entry, described as the entry is now (the gate and report read these fields)."""
        return cls(model=entry.name, model_made_at=entry.manifest.created_at, parent=entry.manifest.parent,
                   method=entry.manifest.method, suite=suite, size_bytes=entry.size_bytes(),
                   quantization=quantization_config(entry), **fields)

    def get(self, key: str) -> Measurement | None:
        return next((m for m in self.measurements if m.key == key), None)

    @field_serializer("speed")
    def _speed_as_saved(self, speed: SpeedRecord) -> dict[str, Any]:
        return speed.saved_form()


# In run order (the text suite reuses the gsm8k suite's generations); the MCQ benchmarks are those evals.datasets
# can load, in its order.
SUITE_BENCHMARKS = {
    "mcq": MCQ_BENCHMARKS,
    "gsm8k": ("gsm8k",),
    "text": ("sciq_text", "gsm8k_text", "rm"),
}


def suite_of(benchmark: str) -> str:
    return next((suite for suite, names in SUITE_BENCHMARKS.items() if benchmark in names), "other")


# --- metric names --------------------------------------------------------------------------------------------

# The metric each /mcq method (zephyr.mcq.METHODS) is recorded under when scored in process; scored through a
# running server's /mcq, the same name ends in SERVER_SUFFIX.
METHOD_METRICS = {"auto": "mcq_acc_auto", "letter": "letter_acc", "cloze": "cloze_acc", "explain": "letter_acc_explain"}
SERVER_SUFFIX = "_server"
# The GSM8K modes every run scores, each recorded as exact_match_<mode>: the gate requires each a baseline has.
GSM8K_MODES = ("0shot_cot", "5shot")
SHARE_PREFIXES = ("cloze_", "letter_", "exact_match", "mcq_acc", "answer_prior_acc", "looping", "names_key",
                  "names_distractor")
# Shares where less is better (answers that repeat themselves, chat answers that name a wrong option): the gate fails
# a rise, not a drop.
LOWER_IS_BETTER_PREFIXES = ("looping", "names_distractor")


def method_metric(method: str, server: bool = False) -> str:
    """The metric of one /mcq method, in process or through a server (KeyError for an unknown method)."""
    return METHOD_METRICS[method] + (SERVER_SUFFIX if server else "")


# /mcq's default method, measured through each model's own calibration record, in process and through a server.
SERVED_METRICS = (method_metric("auto"), method_metric("auto", server=True))


# BERTScore's model and layers, DialogRPT's weights, and which reward model's weights (since 2026-12-07: a reward
# model retrained under the same name is another judge)
JUDGE_DETAILS = ("backbone", "num_layers", "dialogrpt_weights", "reward_model_revision")


def same_judge(a: Measurement, b: Measurement) -> bool:
    """Whether two measurements were scored by the same judge: scores by different reward models, BERTScore
    backbones or layers, or DialogRPT weights are on different scales and must not be compared. A judge detail only
    one of them records (a run from before it was recorded) is taken on trust; other measurements name none."""
    return a.details.get("reward_model") == b.details.get("reward_model") and all(
        a.details[k] == b.details[k] for k in JUDGE_DETAILS if k in a.details and k in b.details)


def is_share(metric: str) -> bool:
    """Accuracy-like metrics: a share in [0, 1], compared in percentage points."""
    return metric.startswith(SHARE_PREFIXES)


def lower_is_better(metric: str) -> bool:
    return metric.startswith(LOWER_IS_BETTER_PREFIXES)


def metric_label(metric: str) -> str:
    """A metric's name as tables and plots show it: a share where less is better says so, so a rise reads right."""
    return f"{metric} (lower is better)" if lower_is_better(metric) else metric


def scale_of(metric: str) -> float:
    return 100.0 if is_share(metric) else 1.0


def measurement(benchmark: str, metric: str, split: str, items: dict[str, float], **extra: Any) -> Measurement:
    values = list(items.values())
    return Measurement(benchmark=benchmark, metric=metric, split=split, n=len(values),
                       score=float(np.mean(values)) if values else float("nan"), items=items, **extra)


def data_read(benchmark: str, metric: str) -> tuple[str, ...]:
    """The data a measurement's figures rest on, by the names `EvalRun.data` gives them: its benchmark's items (the
    text suite's `sciq_text` and the reward model's `rm` read sciq's, `gsm8k_text` gsm8k's) and, for GSM8K's
    5-shot score, the train split its examples come from."""
    if benchmark == "rm":
        return ("sciq",)
    name = benchmark.removesuffix("_text")
    return (name, "gsm8k:train") if (name, metric) == ("gsm8k", "exact_match_5shot") else (name,)


def chosen_sources(runs: list[EvalRun]) -> dict[str, tuple[Measurement, EvalRun]]:
    """Per measurement key, of the runs of `runs` (oldest first) whose measurement of it was computed on the same
    data as the newest one's (`data_digest`), the one that covers the most items, the newest of those that tie, and
    its measurement there. A later `--limit` smoke run does not stand in for a whole split measured before it (the
    gate would compare 40 questions instead of 2,376); a rerun of the same size does replace the older one; and a
    rerun on other data (the local split after a hub copy's larger one) replaces every run on the old data, as the
    gate's advice to re-run on the same data needs."""
    # the newest data a digest names: a newest run without one (saved before digests) would match every run
    newest_data = {m.key: m.data_digest for run in runs for m in run.measurements if m.data_digest}
    chosen: dict[str, tuple[Measurement, EvalRun]] = {}
    for run in runs:
        for m in run.measurements:
            if same_data(m.data_digest, newest_data.get(m.key, {})) and \
                    (m.key not in chosen or m.n >= chosen[m.key][0].n):
                chosen[m.key] = (m, run)
    return chosen


def same_data(a: dict[str, str], b: dict[str, str]) -> bool:
    """Whether two measurements' data digests agree on every split both name: a measurement saved before digests
    were recorded names none, and is taken on trust (as the gate takes it)."""
    return all(a[name] == b[name] for name in a.keys() & b.keys())


class ResultStore:
    """`<root>/<model>/runs/<suite>-<timestamp>.json` keeps every run; of each measurement, the run on the newest
    run's data that covers the most items wins, the newest among equals (chosen_sources).
    Given the registry, a model's runs are those of its current entry: runs of an entry since replaced under the
    same name are left out (runs saved before entries were recorded are kept)."""

    def __init__(self, root: Path, registry: Registry | None = None):
        self.root = Path(root)
        self.registry = registry

    def folder(self, model: str) -> Path:
        """`<root>/<model>`, for a registry name only (RegistryError otherwise): every path here goes through it."""
        return self.root / check_name(model)

    def path_of(self, run: EvalRun) -> Path:
        return self.folder(run.model) / RUNS_DIR / f"{run.suite}-{run.created_at.strftime('%Y%m%dT%H%M%S%fZ')}.json"

    def save(self, run: EvalRun) -> Path:
        path = self.path_of(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, run.model_dump_json(indent=1))
        return path

    def chosen_summary(self, model: str, keys: set[str]) -> dict[str, dict[str, Any]]:
        """What the registry manifest records of `keys` (`zephyr models show`): each from the run the merged view
        takes it from (chosen_sources), so a smoke run saved after a whole-split run does not replace its figures
        there either."""
        return {key: {**summary_of(m, run), "run": str(self.path_of(run))}
                for key, (m, run) in chosen_sources(self.runs(model)).items() if key in keys}

    def runs(self, model: str) -> list[EvalRun]:
        folder = self.folder(model) / RUNS_DIR
        if not folder.is_dir():
            return []
        made_at = self.registry.get(model).manifest.created_at if self.registry and self.registry.exists(model) \
            else None
        runs, replaced = [], 0
        for path in folder.glob("*.json"):
            try:
                run = EvalRun.model_validate_json(path.read_text())
            except ValueError as exc:  # a damaged file (a disk that filled mid-write) must not hide every result
                log.warning("skipping %s: it cannot be read (%s)", path, str(exc).splitlines()[0])
                continue
            if made_at is not None and run.model_made_at is not None and run.model_made_at != made_at:
                replaced += 1
                continue
            runs.append(run)
        if replaced:
            log.warning("%s: %d result runs measured an earlier entry of that name, since replaced; left out",
                        model, replaced)
        return sorted(runs, key=lambda r: r.created_at)

    def latest(self, model: str) -> EvalRun | None:
        """One merged view of a model: each measurement from the run chosen_sources picks."""
        return merge_runs(self.runs(model))


def merge_runs(runs: list[EvalRun]) -> EvalRun | None:
    """`runs` (oldest first, as ResultStore.runs gives them) as one: each measurement from the run chosen_sources
    picks, with the data that run read for it; None for no runs."""
    if not runs:
        return None
    sources = chosen_sources(runs)
    merged = {key: m for key, (m, _) in sources.items()}
    speed = SpeedRecord()
    for run in runs:
        if run.speed.recorded:
            # Figures a newer record lacks stay from an older one, but never its session: which measurement
            # it was decides what it may be compared with (SpeedRecord.same_session).
            speed = speed.model_copy(update={"session": None, "measured_at": run.created_at,
                                             **run.speed.model_dump(exclude_unset=True)})
    # A run that did not record a field (e.g. a server-only run without a size) does not erase an older value.
    described = {field: next((getattr(r, field) for r in reversed(runs) if getattr(r, field) is not None), None)
                 for field in ("parent", "method", "size_bytes", "quantization")}
    data = {name: source for run in runs for name, source in run.data.items()}  # each benchmark's newest, then
    for m, run in sources.values():  # the data each chosen measurement was computed on, which compare_runs checks
        data.update({name: run.data[name] for name in data_read(m.benchmark, m.metric) if name in run.data})
    return runs[-1].model_copy(update={"suite": "merged", "measurements": list(merged.values()), "speed": speed,
                                       "data": data, **described})


def summary_of(m: Measurement, run: EvalRun) -> dict[str, Any]:
    """What the registry manifest records of a measurement: its score and size, and when its run was made."""
    return {"score": round(m.score, 6), "n": m.n, "split": m.split, "at": run.created_at.isoformat()}


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
