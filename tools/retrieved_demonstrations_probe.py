"""Would `/mcq` answer better after the training questions most like each question (retrieved demonstrations, as
in kNN few-shot prompting) than after the calibration record's five fixed ones? Validation splits only.

Every calibration question (`zephyr eval calibrate`'s splits, decontaminated as it does) is scored by cloze and by
the answer prior after its `--count` nearest solved questions, by all-MiniLM-L6-v2 cosine similarity of the
question texts (the safety guard's encoder), from ARC-Easy and ARC-Challenge train, OpenBookQA train past the
questions calibration reads, and MMLU dev; none that a reported or a calibration split holds. The nearest goes last,
next to the question. Then `evals.calibration.fit` is run on those scores and on the saved scores of the model's
last calibration (the fixed demonstrations) for the same questions, and both are printed: each score's accuracy
per set, and the fitted `auto` (5-fold cross-validated, pooled; in-sample per set).

    python -m tools.retrieved_demonstrations_probe --out knn-scores.json [--limit 150]

Findings: docs/evaluation.md, "Retrieved demonstrations".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from evals import calibration, mcq_eval
from evals.calibrate import load_items, load_scores
from offline.benchmarks import CALIBRATION_LIMITS, MCQ_BENCHMARKS, load, reported_copy, without_questions_of
from tools import check_out_folder
from zephyr import mcq
from zephyr.console import make_console
from zephyr.encoder import embed, load_encoder
from zephyr.paths import write_text_atomic
from zephyr.registry import Registry
from zephyr.settings import Settings

SOURCES = (("arc_easy", "train"), ("arc_challenge", "train"), ("openbookqa", "train"), ("mmlu", "dev"))
MAX_QUESTION_CHARS = 300  # a long demonstration costs every option's prompt its length


def pool(settings: Settings, scored: list[Any]) -> list[Any]:
    data_dir = settings.data_dir.resolve()
    items = []
    for name, split in SOURCES:
        skip = CALIBRATION_LIMITS.get(name, 0) if split == "train" else 0  # OpenBookQA's first 500 calibrate
        for item in load(name, split=split, data_dir=settings.data_dir)[skip:]:
            if len(item.question) <= MAX_QUESTION_CHARS and not reported_copy(item, data_dir):
                items.append(item)
    return without_questions_of(items, scored)


def score(settings: Settings, model: str, count: int, limit: int | None, out: Path) -> dict[str, list[dict]]:
    from evals.engine import EvalEngine
    from offline.engine import continuation_loglikelihoods

    data, _ = load_items(settings, list(MCQ_BENCHMARKS), limit)
    solved = pool(settings, [i for _, items in data.values() for i in items])
    encoder = load_encoder()
    index = np.asarray(embed(encoder, [i.question for i in solved], progress=True))
    entry = Registry(settings.models_dir).get(model)
    cue = entry.manifest.mcq_calibration.answer_prior_context if entry.manifest.mcq_calibration else \
        mcq.ANSWER_PRIOR_CONTEXT
    engine = EvalEngine(entry.path, settings)
    scored: dict[str, list[dict]] = {}
    try:
        for name, (_, items) in data.items():
            queries = np.asarray(embed(encoder, [i.question for i in items]))
            requests, priors, nearest = [], [], []
            for item, query in zip(items, queries, strict=True):
                similarity = index @ query
                chosen = [solved[j] for j in np.argsort(-similarity)[:count][::-1]]
                shown = mcq.render_demonstrations([(mcq_eval.question_of(c), c.options[mcq.LETTERS.index(c.answer)])
                                                   for c in chosen])
                q = mcq_eval.question_of(item)
                requests.append(mcq.cloze_requests(engine.tokenizer, q, shown))
                priors.append(mcq.answer_prior_requests(engine.tokenizer, q, cue, shown))
                nearest.append(float(similarity.max()))
            flat = iter(continuation_loglikelihoods(engine.llm, [r for per in requests + priors for r in per]))
            cloze = [[next(flat) for _ in per] for per in requests]
            prior = [[next(flat) for _ in per] for per in priors]
            scored[name] = [{"id": i.id, "gold": mcq.LETTERS.index(i.answer), "options": list(i.options),
                             "support": mcq.normalize_support(i.support) is not None, "cloze": c, "prior": p,
                             "nearest": s} for i, c, p, s in zip(items, cloze, prior, nearest, strict=True)]
            write_text_atomic(out, json.dumps(scored))  # after each set: a long run keeps what it has
    finally:
        engine.shutdown()
    return scored


def compare(settings: Settings, model: str, scored: dict[str, list[dict]]) -> None:
    console = make_console()
    folder = settings.resolved_eval_results_dir / model / "calibration"
    saved = sorted(folder.glob("scores-*.json"))
    if not saved:
        raise SystemExit(f"error: no calibration scores of {model} in {folder} to compare with: run `zephyr eval "
                         f"calibrate --model {model}` first")
    fixed = load_scores(saved[-1])
    pairs: dict[str, tuple[list[calibration.Scored], list[calibration.Scored]]] = {}
    for name, rows in scored.items():
        ids = {r["id"] for r in rows}
        base = sorted((s for s in fixed.scored[name] if s.id in ids), key=lambda s: s.id)
        have = {s.id for s in base}
        knn = sorted((calibration.Scored(dataclasses.replace(
            mcq.cloze_scores(r["options"], r["cloze"], support=r["support"]), answer_prior=r["prior"]),
            r["gold"], r["id"]) for r in rows if r["id"] in have), key=lambda s: s.id)
        pairs[name] = (base, knn)
        for label, items in (("fixed", base), ("retrieved", knn)):
            accuracy = {f: np.mean([np.argmax(getattr(s.scores, f)) == s.gold for s in items])
                        for f in ("cloze", "cloze_norm", "answer_prior")}
            console.print(f"{name:14s} {label:9s} n={len(items):5d} "
                          + " ".join(f"{f} {v:.3f}" for f, v in accuracy.items()))
    for side, label in ((0, "fixed"), (1, "retrieved")):
        items = [s for both in pairs.values() for s in both[side]]
        record, figures = calibration.fit(items)
        cv = figures[record.method]["cross_validated"]
        console.print(f"{label}: {record.method} {record.weights} cross-validated accuracy {cv['accuracy']:.3f} "
                      f"NLL {cv['nll']:.3f} ECE {cv['ece']:.3f}")
        for name, both in pairs.items():
            figures = calibration.evaluate(record, both[side])
            console.print(f"   {name:14s} accuracy {figures['accuracy']:.3f} ECE {figures['ece']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--count", type=int, default=5, help="demonstrations per question (default 5)")
    parser.add_argument("--limit", type=int, default=None, help="the first N calibration questions of each set")
    parser.add_argument("--out", type=Path, default=None, help="the retrieved-demonstration scores (JSON); needed "
                        "unless --scores")
    parser.add_argument("--scores", type=Path, default=None, help="compare scores saved by an earlier run")
    args = parser.parse_args()
    if args.scores is None and args.out is None:
        parser.error("--out is needed to score (or --scores to compare an earlier run's)")
    check_out_folder(args.out)
    settings = Settings()
    scored = json.loads(args.scores.read_text()) if args.scores else score(settings, args.model, args.count,
                                                                           args.limit, args.out)
    compare(settings, args.model, scored)


if __name__ == "__main__":
    main()
