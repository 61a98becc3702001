"""DPO exports leave out pairs whose chosen answer a reviewer flagged incorrect or unsafe (issue 26, item 12):
preferring such an answer would teach it as the better one. `include_flagged` keeps them; milder flags do not
disqualify a chosen answer."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime

import pytest

from service.review.export import ExportOptions, to_jsonl
from service.review.stats import Judgement

AT = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def export(flags: dict[str, list[str]], include_flagged: bool = False, fmt: str = "dpo",
           candidate_answer: str = "Because of the ocean.", left_out: Counter | None = None) -> list[dict]:
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    generations = {
        "item": {"id": "item", "created_at": AT, "model": "m", "messages": messages,
                 "response": [{"content": "Rayleigh scattering."}], "params": {}},
        "cand": {"id": "cand", "created_at": AT, "model": "m", "messages": messages,
                 "response": [{"content": candidate_answer}], "params": {}},
    }
    judgements = [Judgement(item_id="item", reviewer="r0", kind="pair", label="served", strength=3, flags=flags,
                            served_model="m", candidate_id="cand", candidate_model="m"),
                  Judgement(item_id="item", reviewer="r1", kind="pair", label="served", strength=2,
                            served_model="m", candidate_id="cand", candidate_model="m")]
    text, count = to_jsonl(judgements, generations, ExportOptions(fmt, include_flagged=include_flagged), None,
                           left_out)
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


@pytest.mark.parametrize("fmt", ["dpo", "kto", "sft"])
def test_a_preference_between_two_identical_answers_is_left_out_as_a_tie(fmt):
    """A greedy candidate can repeat the served answer word for word: "A is better" between a text and itself is no
    preference (a DPO pair without gradient, a KTO example labelled both ways)."""
    left_out = Counter()
    assert export({}, fmt=fmt, candidate_answer="Rayleigh scattering.\n", left_out=left_out) == []
    assert left_out["identical"] == 1
    assert len(export({}, fmt=fmt)) == (2 if fmt == "kto" else 1)


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


def judged_twice(first_finish: str, second_finish: str) -> tuple[dict[str, dict], list[Judgement]]:
    """One pair of answers judged as two items (i1 against c1, i2 against c2, the same texts), the served answer
    winning both times and flagged incorrect the first; each item's served answer ends as given."""
    messages = [{"role": "user", "content": "Why is the sky blue?"}]

    def answer(gid: str, text: str, finish: str) -> dict:
        return {"id": gid, "created_at": AT, "model": "m", "messages": messages,
                "response": [{"content": text, "finish_reason": finish}], "params": {}}

    generations = {"i1": answer("i1", "Rayleigh scattering.", first_finish), "c1": answer("c1", "The ocean.", "stop"),
                   "i2": answer("i2", "Rayleigh scattering.", second_finish), "c2": answer("c2", "The ocean.", "stop")}
    judgements = [Judgement(item_id=item, reviewer="r0", kind="pair", label="served", strength=3, served_model="m",
                            candidate_id=cand, candidate_model="m", flags=flags)
                  for item, cand, flags in (("i1", "c1", {"served": ["incorrect"]}), ("i2", "c2", {}))]
    return generations, judgements


def test_a_merged_duplicate_is_fit_to_train_on_when_any_of_its_items_is():
    """The same pair judged twice, its winner flagged incorrect once: a default export keeps the unflagged item's
    record, so the merged one of an export that keeps every verdict must say it is fit too."""
    generations, judgements = judged_twice(first_finish="length", second_finish="stop")
    for gid, revision in (("i1", "made:old"), ("c1", "made:old"), ("i2", "made:new"), ("c2", "made:old")):
        generations[gid]["model_revision"] = revision  # other weights wrote the same winning text the second time
    default, _ = to_jsonl(judgements, generations, ExportOptions("dpo"), None)
    assert [json.loads(line)["meta"]["item_ids"] for line in default.splitlines()] == [["i2"]]
    every, _ = to_jsonl(judgements, generations,
                        ExportOptions("dpo", include_flagged=True, include_unfinished=True), None)
    [merged] = [json.loads(line)["meta"] for line in every.splitlines()]
    assert (merged["item_ids"], merged["whole"], merged["chosen_flagged"]) == (["i1", "i2"], True, False)
    assert "chosen_revision" not in merged and merged["rejected_revision"] == "made:old"  # which wrote it: not one


@pytest.mark.parametrize("fmt", ["dpo", "kto", "sft"])
def test_only_answers_the_model_wrote_whole_become_training_text(fmt):
    from collections import Counter

    messages = [{"role": "user", "content": "Why is the sky blue?"}]

    def answer(gid: str, text: str, finish: str | None, model: str = "m", **params) -> dict:
        choice = {"content": text} | ({"finish_reason": finish} if finish else {})
        return {"id": gid, "created_at": AT, "model": model, "messages": messages, "response": [choice],
                "params": params}

    def verdict(item: str, cand: str, label: str = "served") -> Judgement:
        return Judgement(item_id=item, reviewer="r0", kind="pair", label=label, strength=3, served_model="m",
                         candidate_id=cand, candidate_model="m")

    generations = {
        "whole": answer("whole", "Rayleigh scattering.", "stop"),
        "older": answer("older", "Light scatters.", None),  # logged before the reason was kept: taken as whole
        "cut": answer("cut", "Because the light is scattered by the", "length"),
        "guard": answer("guard", "I can't help with that.", "content_filter", safety={"category": "harmful"}),
        "stopped": answer("stopped", "Sure. [the guard's reply]", "stop", answer_safety={"0": {}}),
        "other": answer("other", "Because of the ocean.", "stop", model="candidate-model"),
        "w2": answer("w2", "Molecules scatter blue light more.", "stop"),
        "w3": answer("w3", "Shorter wavelengths scatter.", "stop"),
        "w4": answer("w4", "Blue light scatters most.", "stop"),
    }
    judgements = [verdict("whole", "older"), verdict("w2", "cut"), verdict("w3", "guard"),
                  verdict("stopped", "w4", "candidate"), verdict("w4", "other")]
    left_out: Counter[str] = Counter()
    text, _ = to_jsonl(judgements, generations, ExportOptions(fmt), None, left_out)
    texts = {m["content"] for line in text.splitlines() for r in [json.loads(line)]
             for m in r.get("chosen", []) + r.get("rejected", []) + r.get("completion", [])
             + [x for x in r.get("messages", []) if x["role"] == "assistant"]}
    assert not texts & {"Because the light is scattered by the", "I can't help with that.",
                        "Sure. [the guard's reply]"}
    assert "Rayleigh scattering." in texts and left_out["unfinished"] >= (fmt != "sft")  # sft reads winners only
    # Only one model's answers: the pair with another model's candidate is left out, and counted.
    only: Counter[str] = Counter()
    text, _ = to_jsonl(judgements, generations, ExportOptions(fmt, model="m"), None, only)
    assert "Because of the ocean." not in text and only["other_model"] >= (fmt != "sft")
    if fmt == "dpo":  # a pair with a side the model did not write whole goes, both sides with it
        pairs = [json.loads(line) for line in text.splitlines()]
        assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
            ("Rayleigh scattering.", "Light scatters.")]
        assert only == Counter({"unfinished": 3, "other_model": 1})
    # counted once an item, whatever the format: KTO asks of each answer, and counted an item twice
    both_cut = {"c1": answer("c1", "Because the", "length"), "c2": answer("c2", "Light is", "length")}
    once: Counter[str] = Counter()
    to_jsonl([verdict("c1", "c2")], both_cut, ExportOptions(fmt), None, once)
    assert once == Counter({"unfinished": 1})


def test_every_verdict_is_kept_for_counting_and_the_pairs_say_so():
    messages = [{"role": "user", "content": "Why is the sky blue?"}]

    def answer(gid: str, text: str, finish: str, **params) -> dict:
        return {"id": gid, "created_at": AT, "model": "m", "messages": messages,
                "response": [{"content": text, "finish_reason": finish}], "params": params}

    generations = {"cut": answer("cut", "Because the light is", "length"),
                   "stopped": answer("stopped", "Sure. [the guard's reply]", "stop", answer_safety={"0": {}}),
                   "a": answer("a", "Rayleigh scattering.", "stop"),
                   # the guard stopped another choice of this request, not the one reviewed
                   "b": answer("b", "Light scatters.", "stop", answer_safety={"1": {}})}
    judgements = [Judgement(item_id=item, reviewer="r0", kind="pair", label="served", strength=3, served_model="m",
                            candidate_id=cand, candidate_model="m") for item, cand in (("cut", "a"), ("b", "stopped"))]
    text, _ = to_jsonl(judgements, generations, ExportOptions("dpo"), None)
    assert [json.loads(line)["chosen"][0]["content"] for line in text.splitlines()] == []  # a side not whole each
    text, _ = to_jsonl(judgements, generations, ExportOptions("dpo", include_flagged=True, include_unfinished=True),
                       None)
    pairs = [json.loads(line) for line in text.splitlines()]
    assert [p["chosen"][0]["content"] for p in pairs] == ["Light scatters.", "Because the light is"]  # by item id
    assert all(p["meta"]["kept"] == {"flagged": True, "unfinished": True, "min_agreement": 0.0, "min_reviewers": 1}
               for p in pairs)
    # Each record says whether it is fit to train on (`zephyr data review` reads it): neither pair is.
    assert [(p["meta"]["whole"], p["meta"]["chosen_flagged"]) for p in pairs] == [(False, False), (False, False)]
    text, _ = to_jsonl(judgements, generations, ExportOptions("kto", include_unfinished=True), None)
    kto = [json.loads(line) for line in text.splitlines()]
    assert [(r["meta"]["generation_id"], r["meta"]["whole"]) for r in kto] == [
        ("b", True), ("stopped", False), ("cut", False), ("a", True)]
    assert all(r["meta"]["model"] for r in kto)  # which model wrote each answer, as a pair's meta says
    from service.review.export import written_whole

    assert written_whole(generations["b"]) and not written_whole(generations["stopped"])
    # vLLM says `stop` for a client's stop string or token as for the model's own end: it may have cut the answer
    for client_stop in ({"stop": ["."]}, {"stop_token_ids": [13]}):
        row = {**generations["b"], "params": {**generations["b"]["params"], **client_stop}}
        assert row["response"][0]["finish_reason"] in ("stop", None) and not written_whole(row)
    assert written_whole({**generations["b"], "params": {**generations["b"]["params"], "stop": [],
                                                         "stop_token_ids": []}})
    # an end of turn at once is no answer: it became a DPO chosen answer where reviewers preferred it
    for blank in ("", "  \n"):
        row = {**generations["b"], "response": [{**generations["b"]["response"][0], "content": blank}]}
        assert row["response"][0]["finish_reason"] in ("stop", None) and not written_whole(row)


def test_a_single_answer_called_good_but_flagged_is_left_out_not_made_a_negative():
    """A flagged answer is no desirable example; the reviewers called it good, so it is no undesirable one either
    (as a flagged winner of a pair is left out)."""
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    generations = {"item": {"id": "item", "created_at": AT, "model": "m", "messages": messages,
                            "response": [{"content": "Rayleigh scattering."}], "params": {}}}

    def exported(label: str, flags: dict[str, list[str]], fmt: str) -> list[dict]:
        judgements = [Judgement(item_id="item", reviewer=f"r{i}", kind="single", label=label, served_model="m",
                                flags=flags if i == 0 else {}) for i in range(2)]
        text, _ = to_jsonl(judgements, generations, ExportOptions(fmt), None)
        return [json.loads(line) for line in text.splitlines()]

    assert exported("good", {"served": ["gives_answer"]}, "kto") == []
    assert exported("good", {"served": ["gives_answer"]}, "sft") == []
    assert [r["label"] for r in exported("good", {}, "kto")] == [True]
    assert [r["label"] for r in exported("bad", {"served": ["incorrect"]}, "kto")] == [False]


def test_a_merged_duplicate_is_not_pieced_together_from_two_unfit_items():
    """Judged twice: once whole with its winner flagged incorrect, once cut off and unflagged. Neither item alone is
    fit to train on, so the merged record must not read as whole and unflagged."""
    generations, judgements = judged_twice(first_finish="stop", second_finish="length")
    every, _ = to_jsonl(judgements, generations,
                        ExportOptions("dpo", include_flagged=True, include_unfinished=True), None)
    [merged] = [json.loads(line)["meta"] for line in every.splitlines()]
    assert merged["item_ids"] == ["i1", "i2"] and not (merged["whole"] and not merged["chosen_flagged"])
    default, _ = to_jsonl(judgements, generations, ExportOptions("dpo"), None)
    assert default == ""  # what a default export keeps: nothing
