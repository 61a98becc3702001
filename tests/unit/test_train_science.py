"""Verifiable science pairs from given samples (the vLLM sampling itself is in tests/integration/test_training.py):
labels come from the answer key, prompts from zephyr.mcq, negatives as chosen."""

from __future__ import annotations

from collections import Counter

import pytest

from training.data.science import Sample, build, explained
from zephyr import mcq
from zephyr.schemas import MCQItem

ITEMS = [MCQItem(id=f"q{i}", question=f"Question number {i}?", options=["one", "two", "three", "four"],
                 answer="ABCD"[i % 4]) for i in range(40)]
# The model's own letter distribution: it loves B, then A (like the default model).
BIASED = {"A": 0.3, "B": 0.6, "C": 0.07, "D": 0.03}


def test_direct_pairs_use_the_key_and_the_chosen_negatives():
    direct = {item.id: dict(BIASED) for item in ITEMS}
    pairs, unpaired, stats = build(ITEMS, {}, direct, negatives="mistake")
    by_id = {p.meta["question_id"]: p for p in pairs}
    for item in ITEMS:
        pair = by_id[item.id]
        assert pair.chosen[0].content == item.answer
        assert pair.rejected[0].content == ("A" if item.answer == "B" else "B")  # its favourite wrong letter
        expected = mcq.render_messages(mcq.MCQuestion.build(item.question, item.options))
        assert [m.model_dump() for m in pair.prompt] == expected  # exactly what /mcq sends
    assert stats.direct_pairs == 40 and stats.direct_correct == 10  # B keys: 10 of 40
    assert sum(e.label for e in unpaired) == 40 and len(unpaired) == 80

    balanced, _, _ = build(ITEMS, {}, direct, negatives="balanced", seed=1)
    rejected = Counter(p.rejected[0].content for p in balanced)
    assert all(p.rejected[0].content != p.meta["key"] for p in balanced)
    assert max(rejected.values()) <= 16 and len(rejected) == 4  # no letter is the usual negative
    with pytest.raises(ValueError, match="negatives must be one of"):
        build(ITEMS, {}, direct, negatives="hardest")


def test_explain_pairs_need_a_right_and_a_wrong_explanation():
    item = ITEMS[1]  # key B
    direct = {item.id: dict(BIASED)}
    samples = {item.id: [Sample("Because two.", "B"), Sample("Because one.", "A"), Sample("Hmm.", "C")]}
    pairs, unpaired, stats = build([item], samples, direct)
    explain = [p for p in pairs if p.meta["format"] == "explain"]
    assert len(explain) == 1 and explain[0].chosen[0].content == explained("Because two.", "B")
    assert explain[0].chosen[0].content.endswith(mcq.FINAL_ANSWER_CUE + " B")
    assert stats.correct_explanations == 1 and stats.explanations == 3
    assert [e.label for e in unpaired if e.meta["format"] == "explain"].count(True) == 1
    # Only wrong explanations: no explain pair, the direct pair still made.
    pairs, _, stats = build([item], {item.id: [Sample("One.", "A")]}, direct)
    assert [p.meta["format"] for p in pairs] == ["direct"] and stats.explain_pairs == 0


def test_restate_pairs_name_the_option_then_its_letter():
    from training.data.science import RESTATE, restate_pairs

    pairs, kinds = restate_pairs(ITEMS * 5, seed=3)  # 200 questions
    assert len(pairs) == 200 and sum(kinds.values()) == 200 and min(kinds.values()) > 70
    keys = Counter()
    for pair in pairs:
        user = pair.prompt[-1].content
        options = dict(line.split(". ", 1) for line in user.splitlines() if line[:2] in ("A.", "B.", "C.", "D."))
        key = pair.meta["key"]
        keys[key] += 1
        item = next(i for i in ITEMS if i.id == pair.meta["question_id"])
        assert options[key] == item.options["ABCD".index(item.answer)]  # shuffled, the key follows its text
        assert user.endswith(mcq.EXPLAIN_INSTRUCTION)  # the prompt /mcq sends with explain
        assert pair.chosen[0].content == explained(RESTATE.format(option=options[key]), key)
        wrong = pair.meta["rejected_letter"]
        assert wrong != key
        restated = options[wrong] if pair.meta["rejected"] == "wrong option" else options[key]
        assert pair.rejected[0].content == explained(RESTATE.format(option=restated), wrong)
    assert set(keys) == set("ABCD") and max(keys.values()) < 70  # the key's letter is not predictable


def test_restate_cli_writes_clean_pairs_from_training_splits_only(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from cli.app import app

    data = tmp_path / "data" / "arc" / "ARC-Easy"
    data.mkdir(parents=True)
    texts = ["iron", "wood", "glass", "wool"]
    (data / "ARC-Easy-Train.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "answerKey": "A", "question": {
        "stem": f"Which thing number {i} is a metal?",
        "choices": [{"label": "ABCD"[n], "text": f"{text} {i}"} for n, text in enumerate(texts)]}}) + "\n"
        for i in range(12)))
    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZEPHYR_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(app, ["data", "restate", "--sources", "arc_easy:train", "--out", str(out),
                                      "--no-decontaminate"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and all(r["meta"]["format"] == "restate" for r in rows)
    assert all(r["chosen"][0]["content"].startswith("The correct option is iron") for r in rows)
    refused = CliRunner().invoke(app, ["data", "restate", "--sources", "arc_easy:test", "--out", str(out)])
    assert refused.exit_code != 0 and "refusing arc_easy:test" in " ".join(refused.output.split())
    # Nor the questions `zephyr eval calibrate` fits on: as `data cloze`, both key-labelled builders refuse them.
    for command in (["data", "restate"], ["data", "science", "--k", "0"]):
        refused = CliRunner().invoke(app, [*command, "--sources", "sciq:validation", "--out", str(out)])
        assert refused.exit_code != 0 and "refusing sciq:validation" in " ".join(refused.output.split()), command
