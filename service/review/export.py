"""Reviewer verdicts as training data (DESIGN.md §2 schemas, TRL's conversational format).

What each verdict becomes, by the item's majority label (items with no majority are left out):

| majority            | dpo                      | kto                                   | sft               |
|---------------------|--------------------------|---------------------------------------|-------------------|
| served / candidate  | chosen = preferred       | preferred: True, other: False         | preferred answer  |
| tie                 | left out (no preference) | left out (no absolute judgement)      | left out          |
| served / candidate, both answers one text | left out (a tie; `left_out["identical"]`) | left out | left out |
| both_bad            | left out (no good answer)| both answers: False                   | left out          |
| good (single)       | -                        | True                                  | the answer        |
| bad (single)        | -                        | False                                 | left out          |

An answer any reviewer flagged (incorrect, unsafe, gives the answer away, off-topic) is never used as a
desirable example (KTO True, SFT), and a DPO pair whose chosen answer any reviewer flagged incorrect or unsafe is
left out: preferring it would teach a wrong or unsafe answer as the better one (`include_flagged` keeps them).
Only answers the model wrote whole become training text (`written_whole`): not one cut off at max_tokens (the chat
template would close it, teaching the model to stop mid-sentence) or asked with the client's own stop strings or
token ids (which may have ended it), not the safety guard's reply to a request, nor
an answer the guard stopped with its reply after it (`include_unfinished` keeps them all, for counting verdicts
rather than training on them). A pair with such a side is left out, and counted
(`left_out["unfinished"]`), as are records with an answer of another model than `model`, where it is given
(`left_out["other_model"]`).
Records are ordered by item creation time then id, deduplicated on their
content (the first item's provenance is kept, with every merged item id), redacted again for PII, and written
with sorted keys, so the same database always gives the same file."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from service.review.stats import Judgement, by_item, majority
from service.review.store import answer_text, model_label
from zephyr.clock import utc
from zephyr.pii import Redactor
from zephyr.schemas import KTOExample, Message, PreferencePair, SFTExample

Format = Literal["dpo", "kto", "sft"]
SOURCE = "zephyr-review"


@dataclass(frozen=True)
class ExportOptions:
    format: Format
    min_agreement: float = 0.0
    # `zephyr review export` and GET /review/export default it to ZEPHYR_REVIEW_OVERLAP: complete items only.
    min_reviewers: int = 1
    include_flagged: bool = False  # dpo: keep pairs whose chosen answer was flagged incorrect or unsafe
    # Only records whose every answer this model wrote (the served one, or a candidate of its own sampled otherwise):
    # the pairs for training it on its own answers, without a promotion A/B's candidate or an earlier model's.
    model: str | None = None
    # Keep answers cut off at max_tokens and those the guard refused or stopped: every verdict, for counting them
    # (`eval gate --reviews`: the guard stops one model's answers more than another's), never for training text.
    include_unfinished: bool = False


def _prompt(messages: list[dict[str, Any]]) -> list[Message]:
    return [Message(role=m["role"], content=m["content"]) for m in messages]


def _reply(text: str) -> list[Message]:
    return [Message(role="assistant", content=text)]


# Flags that make an answer unfit to be the chosen one, however the pair was judged.
DISQUALIFYING_FLAGS = ("incorrect", "unsafe")


def _flagged(group: list[Judgement], role: str, only: tuple[str, ...] | None = None) -> bool:
    return any(only is None or flag in only for j in group for flag in j.flags.get(role) or ())


def written_whole(row: dict[str, Any]) -> bool:
    """Whether an answer (a review item's one choice) is the model's own, complete: it ended by itself (`stop`;
    rows logged before the reason was kept count so), with no stop string or token of the client's that could have
    ended it (vLLM says `stop` for those too, and training on it would teach the model to end its turn there), the
    request was not refused (`safety`), the guard did not stop this choice (`answer_safety["0"]`), and it holds
    some text (an end of turn at once is no answer to prefer or learn: it became a DPO chosen answer where
    reviewers preferred it to a worse one)."""
    choice = row["response"][0] if row["response"] else {}
    params = row.get("params") or {}
    return (choice.get("finish_reason") in ("stop", None) and bool((choice.get("content") or "").strip())
            and not params.get("stop")
            and not params.get("stop_token_ids") and "safety" not in params
            and "0" not in (params.get("answer_safety") or {}))


def _fit(meta: dict[str, Any]) -> bool:
    return meta.get("whole", True) and not meta.get("chosen_flagged", False)


def records(judgements: list[Judgement], generations: dict[str, dict], options: ExportOptions,
            redactor: Redactor | None, left_out: Counter[str] | None = None) -> Iterator[BaseModel]:
    left_out = Counter() if left_out is None else left_out

    def clean(text: str) -> str:
        return redactor.redact(text) if redactor else text

    counted: set[tuple[str, str]] = set()

    def leave_out(reason: str) -> None:
        # once an item: KTO asks of each answer, and an item with two unfit answers counted twice
        if (reason, item_id) not in counted:
            counted.add((reason, item_id))
            left_out[reason] += 1

    def whole(*rows: dict[str, Any]) -> bool:
        if options.model is not None and any(row["model"] != options.model for row in rows):
            leave_out("other_model")
            return False
        if options.include_unfinished or all(written_whole(row) for row in rows):
            return True
        leave_out("unfinished")
        return False

    groups = by_item(judgements)
    order = sorted(groups, key=lambda item: (utc(generations[item]["created_at"]), item))
    seen: dict[str, dict[str, Any]] = {}
    for item_id in order:
        group = groups[item_id]
        if len(group) < options.min_reviewers:
            left_out["too_few_reviewers"] += 1
            continue
        label, share = majority([j.label for j in group])
        if label is None or share < options.min_agreement:
            continue
        served = generations[item_id]
        # The candidate the reviewers were shown (every verdict on an item shows the same one).
        candidate = generations.get(group[0].candidate_id) if group[0].candidate_id else None
        answers = {"served": served, "candidate": candidate}
        prompt = _prompt([{**m, "content": clean(m["content"])} for m in served["messages"]])
        meta = {
            "item_ids": [item_id],
            "label": label,
            "reviewers": len(group),
            "agreement": round(share, 4),
            "created_at": utc(served["created_at"]).isoformat(),
            # What the export left out: a win rate counts every verdict only with both kept and no agreement filter
            # (which keeps items by their outcome); a record that holds this and no `for_training` was never
            # filtered for training, which `zephyr train` refuses (training/data/clean.py `cleaning_of`).
            "kept": {"flagged": options.include_flagged, "unfinished": options.include_unfinished,
                     "min_agreement": options.min_agreement, "min_reviewers": options.min_reviewers},
        }
        strengths = [j.strength for j in group if j.label == label and j.strength is not None]
        if strengths:
            meta["strength"] = round(sum(strengths) / len(strengths), 4)

        def of(row: dict[str, Any], meta: dict[str, Any] = meta, served: dict[str, Any] = served) -> dict[str, Any]:
            """One answer's record meta: which model (and weights) wrote it, and whether it is fit to train on
            (`zephyr data review` reads it)."""
            return {**meta, "generation_id": row["id"], "model": model_label(row, served["model"]),
                    **({"model_revision": row["model_revision"]} if row.get("model_revision") else {}),
                    "whole": written_whole(row)}

        out: list[tuple[BaseModel, dict]] = []
        if label in ("served", "candidate") and candidate is not None:
            loser_role = "candidate" if label == "served" else "served"
            winner, loser = answers[label], answers[loser_role]
            # Redacted once (PII detection is the export's costliest step), compared as exported.
            winner_text, loser_text = clean(answer_text(winner)), clean(answer_text(loser))
            if winner_text.strip() == loser_text.strip():
                # A preference between one text and itself says nothing (a greedy candidate, a short answer): as a
                # DPO pair it carries no gradient, as KTO it would push one completion both ways.
                left_out["identical"] += 1
                continue
            # Whether this pair is fit to train on, for an export that keeps every verdict (`zephyr data review`
            # leaves the unfit out): both answers written whole, and the chosen one not flagged incorrect or unsafe.
            provenance = {**meta, "chosen_id": winner["id"], "rejected_id": loser["id"],
                          "chosen_model": model_label(winner, served["model"]),
                          "rejected_model": model_label(loser, served["model"]),
                          "whole": written_whole(winner) and written_whole(loser),
                          "chosen_flagged": _flagged(group, label, DISQUALIFYING_FLAGS),
                          # which weights of each name wrote them (`eval gate --reviews` counts a pair for those)
                          **{f"{side}_revision": row["model_revision"]
                             for side, row in (("chosen", winner), ("rejected", loser)) if row.get("model_revision")}}
            if options.format == "dpo":
                if not options.include_flagged and _flagged(group, label, DISQUALIFYING_FLAGS):
                    continue
                if not whole(winner, loser):
                    continue
                out.append((PreferencePair(prompt=prompt, chosen=_reply(winner_text), rejected=_reply(loser_text),
                                           source=SOURCE, meta=provenance), provenance))
            elif options.format == "kto":
                if not _flagged(group, label) and whole(winner):
                    out.append((KTOExample(prompt=prompt, completion=_reply(winner_text), label=True,
                                           meta=of(winner)), meta))
                if whole(loser):
                    out.append((KTOExample(prompt=prompt, completion=_reply(loser_text), label=False,
                                           meta=of(loser)), meta))
            elif not _flagged(group, label) and whole(winner):
                out.append((SFTExample(messages=prompt + _reply(winner_text), meta=of(winner)), meta))
        elif label == "both_bad" and options.format == "kto" and candidate is not None:
            for row in (served, candidate):
                if not whole(row):
                    continue
                out.append((KTOExample(prompt=prompt, completion=_reply(clean(answer_text(row))), label=False,
                                       meta=of(row)), meta))
        # A flagged answer the majority called good is no desirable example, nor an undesirable one: left out, as a
        # flagged winner of a pair is.
        elif label == "bad" or (label == "good" and not _flagged(group, "served")):
            good = label == "good"
            if options.format == "kto" and whole(served):
                out.append((KTOExample(prompt=prompt, completion=_reply(clean(answer_text(served))), label=good,
                                       meta=of(served)), meta))
            elif options.format == "sft" and good and whole(served):
                out.append((SFTExample(messages=prompt + _reply(clean(answer_text(served))), meta=of(served)), meta))

        for record, _ in out:
            content = record.model_dump(exclude={"meta", "source"})
            key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
            if key in seen:
                merged = seen[key]
                if item_id not in merged["item_ids"]:
                    merged["item_ids"].append(item_id)
                # Fit to train on when any one of the duplicates is (whole and not flagged): a default export would
                # have kept that one. Never pieced together from two unfit ones (one cut off, one flagged).
                if _fit(record.meta) and not _fit(merged):
                    for name in ("whole", "chosen_flagged"):
                        if name in merged:
                            merged[name] = record.meta.get(name)
                for name in ("chosen_revision", "rejected_revision", "model_revision"):  # other weights wrote it too
                    if merged.get(name) != record.meta.get(name):
                        merged.pop(name, None)
                continue
            # Its own list: the records of one item share `meta`, and a duplicate merged into one record must not
            # show up in its sibling's provenance.
            record.meta["item_ids"] = list(record.meta["item_ids"])
            seen[key] = record.meta
            yield record


def to_jsonl(judgements: list[Judgement], generations: dict[str, dict], options: ExportOptions,
             redactor: Redactor | None, left_out: Counter[str] | None = None) -> tuple[str, int]:
    """The whole file and its record count. Records are collected first: a duplicate found later adds its
    item id to an earlier record's provenance."""
    items = list(records(judgements, generations, options, redactor, left_out))
    text = "".join(json.dumps(r.model_dump(exclude_none=True), ensure_ascii=False, sort_keys=True) + "\n"
                   for r in items)
    return text, len(items)


def parse_since(value: str | None, option: str = "--since") -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"{option} {value!r} is not a date; use YYYY-MM-DD or an ISO 8601 timestamp") from exc
    try:
        return utc(parsed)
    except OverflowError as exc:
        raise ValueError(f"{option} {value!r} is out of range in UTC; use a date between the years 1 and 9999"
                         ) from exc
