"""Training data builders: hh-rlhf transcripts, review exports and MCQ training splits."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from offline.benchmarks import TRAINING_SOURCES, SourceError, mcq_training_items
from tests.unit.review_export import write_dpo_export
from training.data.builders import BuildError, from_hh_rlhf, from_review_export
from zephyr.schemas import KTOExample, Message, PreferencePair, SFTExample, write_jsonl
from zephyr.settings import Settings

SHARED = Settings().data_dir
HH_FILE = SHARED / "hh-rlhf-helpful-base" / "test.jsonl.gz"
needs_shared = pytest.mark.skipif(not (SHARED / "arc").is_dir(), reason=f"shared data not found at {SHARED}")


def hh(*turns: tuple[str, str]) -> str:
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


def write_hh(path: Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


SHARED_TURNS = (("Human", "Why is the sky blue?"), ("Assistant", "Rayleigh scattering."),
                ("Human", "What is that?"))
GOOD = {"chosen": hh(*SHARED_TURNS, ("Assistant", "Short wavelengths scatter more off air molecules.")),
        "rejected": hh(*SHARED_TURNS, ("Assistant", "No idea."))}


def test_hh_multi_turn_prompt_is_the_shared_turns(tmp_path):
    pairs, skipped = from_hh_rlhf(write_hh(tmp_path / "hh.jsonl", [GOOD]))
    assert skipped == 0
    [pair] = pairs
    assert [m.role for m in pair.prompt] == ["user", "assistant", "user"]
    assert pair.prompt[0] == Message(role="user", content="Why is the sky blue?")  # the space after "Human:" goes
    assert pair.chosen == [Message(role="assistant", content="Short wavelengths scatter more off air molecules.")]
    assert pair.rejected == [Message(role="assistant", content="No idea.")]
    assert pair.source == "hh-rlhf" and pair.meta == {"row": 0}


def test_hh_prompts_open_with_the_tutors_system_prompt_when_given(tmp_path):
    """Without it SmolLM2's template renders its own default ("You are a helpful AI assistant named SmolLM"), and a
    reward model trained so then ranks rejection sampling's answers, which are sampled after the tutor's."""
    [pair], _ = from_hh_rlhf(write_hh(tmp_path / "hh.jsonl", [GOOD]), system_prompt="You are Zephyr.")
    assert [m.role for m in pair.prompt] == ["system", "user", "assistant", "user"]
    assert pair.prompt[0].content == "You are Zephyr."


def test_hh_malformed_rows_are_skipped_and_counted(tmp_path):
    q = ("Human", "Name a noble gas.")
    rows = [
        {"chosen": hh(q), "rejected": hh(q)},  # no final assistant turn
        {"chosen": hh(q, ("Assistant", "Neon.")), "rejected": hh(q, ("Assistant", "Neon."))},  # chosen == rejected
        {"chosen": hh(q, ("Assistant", "Neon.")),
         "rejected": hh(("Human", "Name a metal."), ("Assistant", "Iron."))},  # differing earlier turns
        {"chosen": hh(q, ("Assistant", "Argon.")), "rejected": hh(q, ("Assistant", "  "))},  # empty reply
        {"chosen": hh(q, ("Assistant", "Hi."), ("Assistant", "Argon.")),
         "rejected": hh(q, ("Assistant", "Hi."), ("Assistant", "Salt."))},  # turns do not alternate
        GOOD,
        # "Human:" inside a turn, without the blank line, is text and not a new turn.
        {"chosen": hh(q, ("Assistant", "Helium. Human: anything else?")), "rejected": hh(q, ("Assistant", "Salt."))},
    ]
    path = write_hh(tmp_path / "hh.jsonl", rows)
    pairs, skipped = from_hh_rlhf(path)
    assert skipped == 5
    assert [p.meta["row"] for p in pairs] == [5, 6]
    assert pairs[1].chosen[0].content == "Helium. Human: anything else?"
    # limit caps the pairs returned; reading stops there.
    pairs, skipped = from_hh_rlhf(path, limit=1)
    assert len(pairs) == 1 and skipped == 5


def test_hh_gzip_file(tmp_path):
    pairs, skipped = from_hh_rlhf(write_hh(tmp_path / "hh.jsonl.gz", [GOOD, GOOD]))
    assert len(pairs) == 2 and skipped == 0
    assert [p.meta["row"] for p in pairs] == [0, 1]


def test_hh_wrong_file_says_what_to_fix(tmp_path):
    with pytest.raises(BuildError, match="does not exist"):
        from_hh_rlhf(tmp_path / "missing.jsonl")
    with pytest.raises(BuildError, match=r"hh\.jsonl:2: .*'chosen' and 'rejected'"):
        from_hh_rlhf(write_hh(tmp_path / "hh.jsonl", [GOOD, {"prompt": "x"}]))
    with pytest.raises(BuildError, match="no usable hh-rlhf pairs"):
        from_hh_rlhf(write_hh(tmp_path / "bad.jsonl", [{"chosen": "x", "rejected": "y"}]))


@pytest.mark.skipif(not HH_FILE.is_file(), reason=f"{HH_FILE} not found")
def test_hh_real_file():
    pairs, skipped = from_hh_rlhf(HH_FILE, limit=50)
    assert len(pairs) == 50
    assert skipped < 5
    for pair in pairs:
        assert pair.prompt[0].role == "user" and pair.prompt[-1].role == "user"
        assert pair.chosen[0].role == pair.rejected[0].role == "assistant"
        assert pair.chosen != pair.rejected
        PreferencePair.model_validate_json(pair.model_dump_json())  # round-trips through the data file schema


# --- review exports ---

PROMPT = [Message(role="user", content="What is 2+2?")]
ANSWER = [Message(role="assistant", content="4")]


def test_review_export_dpo_from_the_real_exporter(tmp_path):
    path, count = write_dpo_export(tmp_path / "dpo.jsonl", [("m", "m2", None, ["served", "served"]),
                                                             ("m", "m2", None, ["candidate"])])
    fmt, records = from_review_export(path)
    assert fmt == "dpo" and len(records) == count == 2
    assert all(isinstance(r, PreferencePair) for r in records)
    # stamped as filtered for training: the gate must not count such a file as every verdict
    from evals.preference import counts_every_verdict

    assert all(r.meta["kept"]["for_training"] and not counts_every_verdict(r.model_dump()) for r in records)


def test_review_export_kto_and_sft(tmp_path):
    kto = tmp_path / "kto.jsonl"
    write_jsonl(kto, [KTOExample(prompt=PROMPT, completion=ANSWER, label=True),
                      KTOExample(prompt=PROMPT, completion=[Message(role="assistant", content="5")], label=False)])
    fmt, records = from_review_export(kto)
    assert fmt == "kto" and [r.label for r in records] == [True, False]

    sft = tmp_path / "sft.jsonl"
    write_jsonl(sft, [SFTExample(messages=PROMPT + ANSWER, meta={"item_ids": ["a"]})])
    fmt, records = from_review_export(sft)
    assert fmt == "sft" and isinstance(records[0], SFTExample)
    assert records[0].meta == {"item_ids": ["a"], "kept": {"for_training": True}}


def test_records_an_export_kept_only_for_counting_verdicts_are_left_out(tmp_path):
    from collections import Counter

    def pair(n: int, **meta) -> PreferencePair:
        return PreferencePair(prompt=[Message(role="user", content=f"q{n}")], chosen=ANSWER, rejected=ANSWER,
                              source="zephyr-review", meta=meta)

    every = {"kept": {"flagged": True, "unfinished": True}}  # an export made for `eval gate --reviews`
    path = tmp_path / "dpo.jsonl"
    write_jsonl(path, [pair(0, whole=True, chosen_flagged=False, **every),
                       pair(1, whole=False, chosen_flagged=False, **every),  # an answer cut off
                       pair(2, whole=True, chosen_flagged=True, **every),  # the winner flagged incorrect
                       pair(3, **every),  # written before the marks: it may be either
                       pair(4)])  # a default export's, before the marks: fit
    left_out: Counter[str] = Counter()
    _, records = from_review_export(path, left_out=left_out)
    assert [r.prompt[0].content for r in records] == ["q0", "q4"]
    assert left_out == {
        "an answer cut off at max_tokens or by the client's stop strings, or written by the safety guard": 2,
        "a chosen answer a reviewer flagged incorrect or unsafe": 1}
    _, records = from_review_export(path, include_unfinished=True)  # a smoke test's short answers
    assert [r.prompt[0].content for r in records] == ["q0", "q1", "q4"]  # q3 may have a flagged winner


def test_review_export_bad_lines(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    write_jsonl(mixed, [PreferencePair(prompt=PROMPT, chosen=ANSWER, rejected=ANSWER, source="s"),
                        SFTExample(messages=PROMPT + ANSWER)])
    with pytest.raises(BuildError, match=r"mixed\.jsonl:2: not a PreferencePair.*one format per file"):
        from_review_export(mixed)

    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"question": "q", "answer": "A"}\n')
    with pytest.raises(BuildError, match=r"unknown\.jsonl:1: not a review export record.*zephyr review export"):
        from_review_export(unknown)

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"messages": [m.model_dump() for m in PROMPT + ANSWER]}) + "\n{not json\n")
    with pytest.raises(BuildError, match=r"broken\.jsonl:2: not a SFTExample"):
        from_review_export(broken)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(BuildError, match="is empty"):
        from_review_export(empty)

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('\n{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"))
    with pytest.raises(BuildError, match=r"latin1\.jsonl:2: not UTF-8 text"):
        from_review_export(latin1)


# --- MCQ training splits ---

@needs_shared
def test_mcq_training_items_from_arc_easy_train():
    items = mcq_training_items(["arc_easy:train"], SHARED, limit_per_source=20)
    assert len(items) == 20
    assert all(item.id.startswith("arc_easy:train/") for item in items)
    assert len({item.id for item in items}) == 20


@needs_shared
def test_mcq_training_ids_unique_across_sources():
    items = mcq_training_items(["arc_easy:train", "arc_challenge:train", "mmlu:dev"], SHARED, limit_per_source=10)
    # Two of MMLU dev's first ten are test questions of another subject (clinical_knowledge-dev-0 is
    # college_medicine-test-152), left out.
    assert len(items) == 28 and len({item.id for item in items}) == 28


def test_a_question_is_its_words_and_its_set_of_options():
    from offline.benchmarks import question_key

    assert question_key("Who would be healthier?", ["a man who eats fruit", "a man who eats candy"]) == \
        question_key("who  would be HEALTHIER", ["A man who eats candy.", "a man who eats fruit"])
    assert question_key("Who would be healthier?", ["fruit", "candy"]) != question_key("Who is healthier?",
                                                                                        ["fruit", "candy"])


def test_items_lose_the_questions_others_ask_whatever_their_ids_and_options_order():
    from offline.benchmarks import without_questions_of
    from zephyr.schemas import MCQItem

    def item(id_, question, options):
        return MCQItem(id=id_, question=question, options=options, answer="A")

    asked = [item("head-1", "Who would be healthier?", ["fruit eater", "candy eater"])]
    items = [item("train-9", "who would be HEALTHIER", ["Candy eater.", "fruit eater"]),  # a copy under another id
             item("train-10", "Who would be healthier?", ["fruit eater", "soda drinker"]),  # other options: kept
             item("head-1", "What melts ice?", ["heat", "cold"])]  # the same id, another question: kept
    assert [i.id for i in without_questions_of(items, asked)] == ["train-10", "head-1"]
    assert without_questions_of(items, []) == items


@needs_shared
def test_a_question_a_reported_split_holds_with_the_same_options_is_never_a_training_item(caplog):
    # OpenBookQA train 14-380 is dev 9-193 with its options reordered: three words, too short for the text
    # decontamination's match; dev is the split we report.
    items = mcq_training_items(["openbookqa:train"], SHARED)
    assert "openbookqa:train/14-380" not in {item.id for item in items}
    assert "14-380 = openbookqa/9-193" in caplog.text
    kept = mcq_training_items(["openbookqa:train"], SHARED, exclude_reported=False)  # --no-decontaminate
    assert "openbookqa:train/14-380" in {item.id for item in kept}


@pytest.mark.parametrize("source", ["arc_easy:test", "openbookqa:validation", "sciq:test", "mmlu:test"])
def test_mcq_refuses_the_split_we_report(source, tmp_path):
    # Refused before any file is read: tmp_path holds no data.
    with pytest.raises(SourceError, match="never train on the split we report"):
        mcq_training_items(["arc_easy:train", source], tmp_path)


def test_mcq_unknown_sources_list_the_known_ones(tmp_path):
    for sources in (["gsm8k:train"], ["arc_easy"], ["arc_easy:validation"]):
        with pytest.raises(SourceError, match="known sources: " + ", ".join(TRAINING_SOURCES)):
            mcq_training_items(sources, tmp_path)
    with pytest.raises(SourceError, match="listed twice"):
        mcq_training_items(["mmlu:dev", "mmlu:dev"], tmp_path)
    with pytest.raises(SourceError, match="arc_easy:train: .*does not exist"):
        mcq_training_items(["arc_easy:train"], tmp_path)
