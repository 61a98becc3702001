"""`zephyr eval calibrate`: score every validation question of the MCQ benchmarks by letter and by cloze, fit /mcq's
`auto` for one registry model (evals/calibration.py), and write the record into its zephyr.json.

Only validation data is read. OpenBookQA's local copy has no test split, so its dev split is the one we report:
its calibration questions come from its train split instead."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from evals import calibration, datasets, mcq_eval
from evals.run import needs_transformers
from zephyr import mcq
from zephyr.registry import Registry
from zephyr.settings import Settings

CALIBRATION_SPLITS = {"arc_easy": "validation", "arc_challenge": "validation", "mmlu": "validation",
                      "sciq": "validation", "openbookqa": "train"}
OPENBOOKQA_TRAIN_QUESTIONS = 500  # as many as its dev split, from the train split's start


class CalibrationError(ValueError):
    """A calibration that cannot start as asked; the message says what to change."""


def load_items(settings: Settings, benchmarks: list[str], limit: int | None) -> dict[str, tuple[str, list[Any]]]:
    data = {}
    for name in benchmarks:
        if name not in CALIBRATION_SPLITS:
            raise CalibrationError(f"unknown MCQ benchmark {name!r}; known: {', '.join(CALIBRATION_SPLITS)}")
        split = CALIBRATION_SPLITS[name]
        cap = OPENBOOKQA_TRAIN_QUESTIONS if name == "openbookqa" else None
        cap = min(x for x in (cap, limit) if x is not None) if (cap or limit) else None
        data[name] = (split, datasets.load(name, split=split, data_dir=settings.data_dir, limit=cap))
    return data


def calibrate(model: str, settings: Settings, console: Console, limit: int | None = None,
              benchmarks: list[str] | None = None, write: bool = True) -> mcq.MCQCalibration:
    registry = Registry(settings.models_dir)
    entry = registry.get(model)
    data = load_items(settings, benchmarks or list(CALIBRATION_SPLITS), limit)
    if needs_transformers(entry):
        from evals.hf_letter import TransformersEngine

        engine: Any = TransformersEngine(entry.path)
    else:
        from evals.engine import EvalEngine

        console.print(f"starting vLLM on {entry.path} ...")
        engine = EvalEngine(entry.path, settings)
    try:
        letters = {name: engine.letter(name, split, items) for name, (split, items) in data.items()}
        with tempfile.TemporaryDirectory(prefix="zephyr-calibrate-") as workdir:
            cloze = {m.benchmark: m for m in mcq_eval.cloze(engine.lm, data, Path(workdir)) if m.metric == "cloze_acc"}
    finally:
        engine.shutdown()
    scored: dict[str, list[calibration.Scored]] = {}
    for name, (_, items) in data.items():
        scores = mcq_eval.option_scores(items, letters[name], cloze[name])
        scored[name] = [calibration.Scored(scores[i.id], mcq.LETTERS.index(i.answer)) for i in items]
    pooled = [s for items in scored.values() for s in items]
    record, figures = calibration.fit(pooled)
    per_benchmark = {name: calibration.evaluate(record, items) for name, items in scored.items()}
    record.validation.update({
        "splits": {name: {"split": split, "n": len(items)} for name, (split, items) in data.items()},
        "benchmarks": {name: {k: f[k] for k in ("n", "accuracy", "ece", "brier", "nll")}
                       for name, f in per_benchmark.items()},
    })
    console.print(candidates_table(model, record, figures))
    console.print(benchmarks_table(record, per_benchmark))
    if write:
        registry.record_calibration(model, record)
        weights = ", ".join(f"{k} {v:.3f}" for k, v in record.weights.items())
        console.print(f"auto for {model}: [bold]{record.method}[/] (weights {weights}) -> {entry.path / 'zephyr.json'}")
    return record


def candidates_table(model: str, record: mcq.MCQCalibration, figures: dict[str, dict[str, Any]]) -> Table:
    table = Table(title=f"{model}: /mcq methods on {record.validation['n']} validation questions, before -> after "
                        "calibration", caption="chosen by validation accuracy; NLL and ECE (15 bins) show calibration")
    for column in ("method", "accuracy", "NLL", "ECE", "weights"):
        table.add_column(column, justify="left" if column in ("method", "weights") else "right")
    for name, f in figures.items():
        raw, fitted = f["raw"], f["fitted"]
        table.add_row(Text(name + (" (chosen)" if name == record.method else ""),
                           style="bold" if name == record.method else ""),
                      Text(f"{raw['accuracy']:.1%} -> {fitted['accuracy']:.1%}"),
                      Text(f"{raw['nll']:.3f} -> {fitted['nll']:.3f}"),
                      Text(f"{raw['ece']:.3f} -> {fitted['ece']:.3f}"),
                      Text(", ".join(f"{k} {v:.3f}" for k, v in f["weights"].items())))
    return table


def benchmarks_table(record: mcq.MCQCalibration, per_benchmark: dict[str, dict[str, Any]]) -> Table:
    table = Table(title=f"auto ({record.method}) on each validation set")
    for column in ("benchmark", "split", "n", "accuracy", "ECE", "Brier", "acc @80%", "acc @50%"):
        table.add_column(column, justify="left" if column in ("benchmark", "split") else "right")
    for name, f in per_benchmark.items():
        coverage = f["coverage_accuracy"]
        table.add_row(name, CALIBRATION_SPLITS[name], str(f["n"]), f"{f['accuracy']:.1%}", f"{f['ece']:.3f}",
                      f"{f['brier']:.3f}", f"{coverage['80%']:.1%}", f"{coverage['50%']:.1%}")
    return table
