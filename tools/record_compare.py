"""Two calibration records applied to the same stored scores: what a new record changes on a reported split,
question by question, with nothing scored again.

`zephyr eval run --suite mcq` keeps every question's cloze and answer-prior log-likelihoods; this applies the
model's current record (`auto` as served) and another record (`--before`, a `zephyr.json`, a shipped record file or
a bare record) to them through zephyr/mcq.py's plan, and prints per benchmark accuracy, ECE, Brier and NLL of both,
with paired bootstrap intervals (over questions) of the differences in accuracy, Brier and NLL. Either record may
read question domains; they are computed for the questions that need them, as the service computes them.

    git show HEAD~1:zephyr/calibrations/smollm2-135m-instruct.json > /tmp/before.json
    python -m tools.record_compare --model smollm2-135m-instruct --before /tmp/before.json

Only records fitted on validation splits belong here; this reads reported splits, and fits nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from evals import calibration, mcq_eval
from evals.results import ResultStore
from evals.stats import paired_bootstrap
from offline import benchmarks
from zephyr import mcq
from zephyr.console import make_console
from zephyr.registry import Registry
from zephyr.settings import Settings


def read_record(path: Path) -> mcq.MCQCalibration:
    """A record from a model's zephyr.json (`mcq_calibration`), a shipped record file (`record`), or bare."""
    raw: Any = json.loads(path.read_text())
    for key in ("mcq_calibration", "record"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    return mcq.MCQCalibration.model_validate(raw)


def per_question(record: mcq.MCQCalibration, items: list[Any], scores: dict[str, mcq.OptionScores],
                 encoder: Any) -> dict[str, tuple[list[float], int, int]]:
    """id -> (probabilities, answer index, key index) of `auto` under `record`."""
    plan = mcq.plan("auto", record)
    if plan.needs_domain and record.question_domain is not None:
        domains = mcq_eval.question_domains(items, record.question_domain, encoder)
        scores = {i: dataclasses.replace(s, domain=domains[i]) for i, s in scores.items()}
    out = {}
    for item in items:
        probabilities, answer = plan.distribution(scores[item.id], mcq.LETTERS[: len(item.options)])
        out[item.id] = (list(probabilities.values()), list(probabilities).index(answer),
                        mcq.LETTERS.index(item.answer))
    return out


def delta(rows: dict[str, dict[str, Any]], kind: str, scale: float = 1.0, digits: int = 3) -> str:
    """after - before of one per-question figure, with its paired bootstrap interval."""
    d = paired_bootstrap(rows["after"][kind], rows["before"][kind])
    return f"{d.delta * scale:+.{digits}f} [{d.low * scale:+.{digits}f}, {d.high * scale:+.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="registry model whose stored mcq runs and record are read")
    parser.add_argument("--before", type=Path, required=True, help="the other record (JSON)")
    parser.add_argument("--benchmarks", default=",".join(benchmarks.MCQ_BENCHMARKS))
    args = parser.parse_args()
    console = make_console()
    settings = Settings()
    registry = Registry(settings.models_dir)
    after = registry.get(args.model).manifest.mcq_calibration
    if after is None:
        parser.error(f"{args.model} has no calibration record")
    before = read_record(args.before)
    latest = ResultStore(settings.resolved_eval_results_dir, registry).latest(args.model)  # this entry's runs only
    if latest is None:
        parser.error(f"{args.model} has no stored runs: `zephyr eval run --model {args.model} --suite mcq` first")
    encoder = None
    if after.reads_question_domain or before.reads_question_domain:
        from zephyr.encoder import load_encoder

        encoder = load_encoder()
    table = Table(title=f"{args.model}: auto under the record before -> now, on the same stored scores")
    for column in ("benchmark (split, n)", "accuracy", "Δ [95%]", "ECE", "Brier", "Δ Brier [95%]", "NLL",
                   "Δ NLL [95%]", "mean confidence"):
        table.add_column(column, justify="left" if column.startswith("bench") else "right")
    for name in [n.strip() for n in args.benchmarks.split(",") if n.strip()]:
        cloze = latest.get(f"{name}/cloze_acc")
        prior = latest.get(f"{name}/answer_prior_acc")
        if cloze is None:
            console.print(f"[yellow]{name}: no stored cloze scores; skipped[/]")
            continue
        # The stored scores were taken after one record's demonstrations and answer cue: both records must ask
        # with the same ones, or the figures describe neither.
        stored = (cloze.details.get("demonstrations", ""), prior.details.get("context") if prior else None)
        unlike = [label for label, record in (("before", before), ("after", after))
                  if record.demonstrations != stored[0]
                  or (stored[1] is not None and record.answer_prior_context != stored[1])]
        if unlike:
            console.print(f"[yellow]{name}: the stored scores were taken after other demonstrations or answer cue "
                          f"than the {' and '.join(unlike)} record's; skipped (rerun `zephyr eval run` under it)[/]")
            continue
        split = cloze.split
        items = benchmarks.load(name, split=split, data_dir=settings.data_dir)
        if (digest := cloze.data_digest.get(name)) and benchmarks.fingerprint(items) != digest:
            console.print(f"[yellow]{name}: {settings.data_dir} holds other {split} items than the stored run read; "
                          "skipped[/]")
            continue
        items = [i for i in items if i.id in cloze.details["loglikelihoods"]]
        if not items:
            console.print(f"[yellow]{name}: no stored question is in {settings.data_dir}'s {split} split; skipped[/]")
            continue
        scores = mcq_eval.option_scores(items, None, cloze, prior)
        try:
            given = {label: per_question(record, items, scores, encoder) for label, record in
                     (("before", before), ("after", after))}
        except ValueError as exc:  # a record reads scores this run does not have (the answer prior)
            console.print(f"[yellow]{name}: {exc}; skipped[/]")
            continue
        figures, rows = {}, {}
        for label, answered in given.items():
            ids = list(answered)
            figures[label] = calibration.summarize([answered[i][0] for i in ids], [answered[i][2] for i in ids],
                                                   [answered[i][1] for i in ids])
            rows[label] = {
                "correct": {i: float(a == k) for i, (_, a, k) in answered.items()},
                "brier": {i: sum((p - (j == k)) ** 2 for j, p in enumerate(probs)) for i, (probs, _, k) in
                          answered.items()},
                "nll": {i: -math.log(max(probs[k], 1e-12)) for i, (probs, _, k) in answered.items()},
                "confidence": sum(max(p) for p, _, _ in answered.values()) / len(answered)}

        b, a = figures["before"], figures["after"]
        table.add_row(f"{name} ({split}, {len(items):,})", f"{b['accuracy']:.1%} -> {a['accuracy']:.1%}",
                      delta(rows, "correct", 100, 1), f"{b['ece']:.3f} -> {a['ece']:.3f}",
                      f"{b['brier']:.3f} -> {a['brier']:.3f}", delta(rows, "brier"),
                      f"{b['nll']:.3f} -> {a['nll']:.3f}", delta(rows, "nll"),
                      f"{rows['before']['confidence']:.2f} -> {rows['after']['confidence']:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
