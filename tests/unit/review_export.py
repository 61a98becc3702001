"""A DPO review export written by the real exporter (service/review/export.py) from hand-made verdicts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

# (served model, candidate model, candidate variant, labels by reviewers)
Case = tuple[str, str, str | None, list[str]]


def write_dpo_export(path: Path, cases: list[Case]) -> tuple[Path, int]:
    from service.review.export import ExportOptions, to_jsonl
    from service.review.stats import Judgement

    t0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
    generations: dict[str, dict] = {}
    judgements = []
    for n, (served_model, cand_model, variant, labels) in enumerate(cases):
        item, cand = f"item{n}", f"item{n}-cand"
        messages = [{"role": "user", "content": f"question {n}"}]
        at = t0 + timedelta(minutes=n)
        generations[item] = {"id": item, "created_at": at, "model": served_model, "messages": messages,
                             "response": [{"content": f"served answer {n}"}], "params": {}}
        generations[cand] = {"id": cand, "created_at": at, "model": cand_model, "messages": messages,
                             "response": [{"content": f"candidate answer {n}"}],
                             "params": {"variant": variant} if variant else {}}
        for r, label in enumerate(labels):
            judgements.append(Judgement(item_id=item, reviewer=f"r{r}", kind="pair", label=label,
                                        strength=3 if label in ("served", "candidate") else None,
                                        served_model=served_model, candidate_id=cand, candidate_model=cand_model))
    text, count = to_jsonl(judgements, generations, ExportOptions(format="dpo"), redactor=None)
    path.write_text(text)
    return path, count
