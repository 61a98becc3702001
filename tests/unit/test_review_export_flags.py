"""DPO exports leave out pairs whose chosen answer a reviewer flagged incorrect or unsafe (issue 26, item 12):
preferring such an answer would teach it as the better one. `include_flagged` keeps them; milder flags do not
disqualify a chosen answer."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from service.review.export import ExportOptions, to_jsonl
from service.review.stats import Judgement

AT = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def export(flags: dict[str, list[str]], include_flagged: bool = False, fmt: str = "dpo") -> list[dict]:
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    generations = {
        "item": {"id": "item", "created_at": AT, "model": "m", "messages": messages,
                 "response": [{"content": "Rayleigh scattering."}], "params": {}},
        "cand": {"id": "cand", "created_at": AT, "model": "m", "messages": messages,
                 "response": [{"content": "Because of the ocean."}], "params": {}},
    }
    judgements = [Judgement(item_id="item", reviewer="r0", kind="pair", label="served", strength=3, flags=flags,
                            served_model="m", candidate_id="cand", candidate_model="m"),
                  Judgement(item_id="item", reviewer="r1", kind="pair", label="served", strength=2,
                            served_model="m", candidate_id="cand", candidate_model="m")]
    text, count = to_jsonl(judgements, generations, ExportOptions(fmt, include_flagged=include_flagged), None)
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("flag", ["incorrect", "unsafe"])
def test_a_chosen_answer_flagged_incorrect_or_unsafe_leaves_the_pair_out(flag):
    assert export({"served": [flag]}) == []
    [kept] = export({"served": [flag]}, include_flagged=True)
    assert kept["chosen"][0]["content"] == "Rayleigh scattering."


def test_milder_flags_and_flags_on_the_rejected_answer_keep_the_pair():
    assert len(export({"served": ["gives_answer"]})) == 1
    assert len(export({"candidate": ["incorrect", "unsafe"]})) == 1
    assert len(export({})) == 1


def test_a_merged_duplicate_names_its_items_on_that_record_only():
    """Two items with the same question and the same good answer but different losers: the good answer is one KTO
    record naming both items; each loser names its own item alone."""
    messages = [{"role": "user", "content": "Why is the sky blue?"}]

    def answer(gid: str, text: str) -> dict:
        return {"id": gid, "created_at": AT, "model": "m", "messages": messages, "response": [{"content": text}],
                "params": {}}

    generations = {"i1": answer("i1", "Rayleigh scattering."), "i2": answer("i2", "Rayleigh scattering."),
                   "c1": answer("c1", "Because of the ocean."), "c2": answer("c2", "Clouds paint it.")}
    judgements = [Judgement(item_id=item, reviewer="r0", kind="pair", label="served", strength=3, served_model="m",
                            candidate_id=cand, candidate_model="m") for item, cand in (("i1", "c1"), ("i2", "c2"))]
    text, _ = to_jsonl(judgements, generations, ExportOptions("kto"), None)
    records = [json.loads(line) for line in text.splitlines()]
    assert [(r["meta"]["generation_id"], r["meta"]["item_ids"]) for r in records] == [
        ("i1", ["i1", "i2"]), ("c1", ["i1"]), ("c2", ["i2"])]
