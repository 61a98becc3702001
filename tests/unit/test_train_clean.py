"""training.data.clean: PII, decontamination, length filters, exact and near duplicates, and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from training.data.clean import CleanOptions, CleanReport, ContaminationIndex, clean, clean_file
from zephyr.schemas import KTOExample, PreferencePair, SFTExample, VerifiablePrompt, read_jsonl
from zephyr.settings import Settings

# Only the stage under test is on: the default index would read every benchmark, the default redactor
# builds Presidio; each test opts in to what it checks.
OFF = dict(redact_pii=False, dedupe=False, near_dup_threshold=None, decontaminate=False)

LONG_REPLY = (
    "Photosynthesis happens in the chloroplasts of plant cells. Chlorophyll absorbs mostly red and blue light "
    "and reflects green light, which is why leaves look green to us. The light reactions split water and "
    "release oxygen, while the Calvin cycle uses carbon dioxide from the air to build sugars such as glucose. "
    "Plants use those sugars for energy and to grow new roots, stems and leaves over the growing season."
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def sft(question, answer, **meta):
    return SFTExample(messages=[user(question), assistant(answer)], meta=meta)


def pair(question, chosen, rejected, source="review"):
    return PreferencePair(prompt=[user(question)], chosen=[assistant(chosen)], rejected=[assistant(rejected)],
                          source=source)


def unstamped(records):
    """The records without the cleaning stamp (`meta.cleaned`) that every cleaned record carries."""
    return [r.model_copy(update={"meta": {k: v for k, v in r.meta.items() if k != "cleaned"}}) for r in records]


class FakeTokenizer:
    """One token per word of the rendered chat; enough to test the max_tokens filter without a model."""

    def apply_chat_template(self, messages, tokenize=False):
        assert not tokenize
        return "".join(f"<{m['role']}> {m['content']} </s> " for m in messages)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


@pytest.fixture(scope="module")
def redactor():
    from zephyr.pii import Redactor

    settings = Settings()
    return Redactor(settings.pii_entities, settings.student_id_pattern)


def test_pii_is_redacted_in_prompt_and_replies_and_counted(redactor):
    records = [
        pair("My email is jane.doe@example.com, why is the sky blue?",
             "Rayleigh scattering. Call me on 415-555-0132 if unsure.", "No idea."),
        sft("What is a mole?", "A count: 6.022e23 particles."),
        KTOExample(prompt=[user("Why do we sweat?")], completion=[assistant("Email bob@school.edu to ask.")],
                   label=False),
    ]
    cleaned, report = clean(records, CleanOptions(**{**OFF, "redact_pii": True}), redactor=redactor)

    assert report.pii_redacted == 2 and report.output == 3 and len(report.examples["pii_redacted"]) == 2
    first, untouched, kto = cleaned
    assert first.prompt[0].content == "My email is <EMAIL_ADDRESS>, why is the sky blue?"
    assert first.chosen[0].content == "Rayleigh scattering. Call me on <PHONE_NUMBER> if unsure."
    assert first.rejected == records[0].rejected and first.source == "review"
    assert kto.completion[0].content == "Email <EMAIL_ADDRESS> to ask." and isinstance(kto, KTOExample)
    assert unstamped([untouched]) == [records[1]]  # nothing to redact
    assert "jane.doe" in records[0].prompt[0].content  # the input records are not modified


def test_exact_duplicates_ignore_meta_and_source():
    records = [sft("What is a cell?", "The smallest unit of life.", item=1),
               sft("What is a cell?", "The smallest unit of life.", item=2),
               sft("What is a cell?", "The basic unit of life."),
               pair("Q?", "A good answer.", "A bad answer.", source="review"),
               pair("Q?", "A good answer.", "A bad answer.", source="hh-rlhf")]
    cleaned, report = clean(records, CleanOptions(**{**OFF, "dedupe": True}))
    assert unstamped(cleaned) == [records[0], records[2], records[3]]
    assert report.exact_duplicates == 2 and report.examples["exact_duplicates"][0].startswith("#1: same as #0")


def test_near_duplicate_is_removed_and_a_different_record_stays():
    edited = LONG_REPLY.replace("mostly red", "largely red")
    records = [sft("How do plants make food?", LONG_REPLY),
               sft("How do plants make food?", edited),
               sft("How do plants make food?", "Plants take in sunlight, water and carbon dioxide and make glucose "
                   "in their leaves; oxygen is released as a by-product of the process."),
               sft("Why is the sea salty?", "Rivers carry dissolved minerals from rocks into the sea, and when "
                   "water evaporates the salt stays behind, so it builds up over millions of years.")]
    options = CleanOptions(**{**OFF, "near_dup_threshold": 0.9})
    cleaned, report = clean(records, options)
    assert unstamped(cleaned) == [records[0], records[2], records[3]]
    assert report.near_duplicates == 1 and report.examples["near_duplicates"][0].startswith("#1: like #0")
    # Deterministic: the same input loses the same records on every run.
    assert clean(records, options)[0] == cleaned
    # A stricter threshold keeps the edited copy.
    assert clean(records, CleanOptions(**{**OFF, "near_dup_threshold": 0.99}))[1].near_duplicates == 0


def test_same_long_prompt_with_different_short_answers_is_not_a_near_duplicate():
    # The science builder's direct-format examples: one long MCQ prompt, answered by a single letter.
    prompt = [user("Question: " + LONG_REPLY + "\n\nA. red\nB. blue\nC. green\nD. white\n\nAnswer with the letter.")]
    records = [KTOExample(prompt=prompt, completion=[assistant("B")], label=True),
               KTOExample(prompt=prompt, completion=[assistant("C")], label=False),
               PreferencePair(prompt=prompt, chosen=[assistant("B")], rejected=[assistant("C")], source="science"),
               PreferencePair(prompt=prompt, chosen=[assistant("B")], rejected=[assistant("A")], source="science")]
    cleaned, report = clean(records, CleanOptions(**{**OFF, "near_dup_threshold": 0.9}))
    assert unstamped(cleaned) == records and report.near_duplicates == 0


def test_the_same_long_answer_marked_good_and_bad_is_two_verdicts_not_a_near_duplicate():
    """Reviewers who disagree: the label once counted as one shingle among a long reply's, too few to tell them
    apart, so the second verdict was dropped as a near duplicate (found by a review)."""
    prompt, answer = [user("Why is the sky blue?")], [assistant(LONG_REPLY)]
    records = [KTOExample(prompt=prompt, completion=answer, label=True),
               KTOExample(prompt=prompt, completion=answer, label=False),
               KTOExample(prompt=prompt, completion=[assistant(LONG_REPLY + " Truly.")], label=True)]
    cleaned, report = clean(records, CleanOptions(**{**OFF, "near_dup_threshold": 0.9}))
    assert unstamped(cleaned) == records[:2] and report.near_duplicates == 1  # the same verdict again goes


def test_length_filters_on_each_reply_and_on_tokens():
    records = [pair("Q1?", "Fine answer.", "   "),  # a blank rejected reply is too short
               pair("Q2?", "x" * 50, "Fine answer."),  # chosen over max_chars
               sft("Q3?", "Fine answer."),
               SFTExample(messages=[user("Q4?"), user("Still there?")]),  # no assistant reply at all
               KTOExample(prompt=[user("Q5?")], completion=[assistant("word " * 30)], label=True)]
    cleaned, report = clean(records, CleanOptions(**{**OFF, "min_chars": 2, "max_chars": 40}))
    assert unstamped(cleaned) == [records[2]]
    assert (report.too_short, report.too_long) == (2, 2)
    assert report.examples["too_short"][0].startswith("#0: rejected 0 chars")
    assert report.examples["too_long"][0].startswith("#1: chosen 50 chars")

    # Tokens count the whole rendered conversation: prompt, reply and template markup.
    options = CleanOptions(**{**OFF, "max_tokens": 12, "max_chars": None})
    cleaned, report = clean(records[2:3] + records[4:], options, tokenizer=FakeTokenizer())
    assert unstamped(cleaned) == [records[2]] and report.too_long == 1 and "tokens" in report.examples["too_long"][0]
    with pytest.raises(ValueError, match="max_tokens needs a tokenizer"):
        clean(records, options)
    # GRPO's prompts have no reply: the prompt alone is counted (max() of nothing was a ValueError)
    prompts = [VerifiablePrompt(prompt=[user(text)], answer="A", letters="AB", source="test")
               for text in ("Which is a gas?", "word " * 30)]
    cleaned, report = clean(prompts, options, tokenizer=FakeTokenizer())
    assert unstamped(cleaned) == prompts[:1] and report.too_long == 1


QUIZ = ["A ball is dropped from a height of twenty meters and falls freely under gravity until it hits the ground. "
        "How long does the fall take?",
        "What is the boiling point of water at sea level?",  # 10 words: matched whole
        "Why is the sky blue?"]  # 5 words, the shortest question matched whole


def test_decontamination_catches_a_planted_test_question():
    index = ContaminationIndex.from_texts({"quiz": QUIZ, "other": ["Completely unrelated text about stars."]})
    planted = SFTExample(messages=[
        user("Here is my homework: a ball is dropped from a height of twenty meters, and falls freely under "
             "gravity until it hits the ground! Can you help?"), assistant("Use h = g t^2 / 2.")])
    in_reply = pair("Explain free fall.", "Consider: what is the boiling point of water at sea level? It is 100 C.",
                    "I don't know.")
    clean_one = sft("What is the boiling point of ethanol?", "About 78 degrees Celsius at sea level.")
    cleaned, report = clean([planted, in_reply, clean_one], CleanOptions(**{**OFF, "decontaminate": True}),
                            index=index)
    assert unstamped(cleaned) == [clean_one]
    assert report.contaminated == {"quiz": 2, "other": 0}
    assert report.examples["contaminated"][0].startswith("#0: quiz")


def test_short_test_questions_match_whole_and_tiny_ones_not_at_all():
    index = ContaminationIndex.from_texts({"quiz": QUIZ + ["What is a cell?"]})
    assert index.matches("So, WHAT is the boiling-point of water at sea level?? Think.") == ["quiz"]
    assert index.matches("What is the boiling point of water?") == []  # part of a short question is not enough
    assert index.matches("Why is the sky blue") == ["quiz"]  # exactly MIN_WHOLE_WORDS words
    assert index.matches("What is a cell? A unit of life.") == []  # under 5 words: too generic to count
    # Text repeated across many test questions is a template, not a question.
    templated = ContaminationIndex.from_texts({"quiz": ["Which of the following is true?"] * 4})
    assert templated.matches("Which of the following is true?") == []
    assert ContaminationIndex.from_texts({"quiz": ["Which of the following is true?"] * 4},
                                         max_df=None).matches("which of the following is true") == ["quiz"]


def test_from_benchmarks_flags_a_real_arc_easy_test_question_but_not_a_train_one():
    data_dir = Settings().data_dir
    if not (data_dir / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl").exists():
        pytest.skip(f"no benchmark data in {data_dir}")
    from offline.benchmarks import load

    test_stem = next(i.question for i in load("arc_easy", "test", data_dir=data_dir) if len(i.question.split()) > 15)
    train_stem = next(i.question for i in load("arc_easy", "train", data_dir=data_dir)
                      if len(i.question.split()) > 15)
    index = ContaminationIndex.from_benchmarks(data_dir)
    assert set(index.names) == {"arc_easy", "arc_challenge", "mmlu", "sciq", "openbookqa", "gsm8k"}

    planted = sft(f"My teacher asked: {test_stem} What do you think?", "Let's reason it through together.")
    train = sft(f"My teacher asked: {train_stem} What do you think?", "Let's reason it through together.")
    cleaned, report = clean([planted, train], CleanOptions(**{**OFF, "decontaminate": True}), index=index)
    assert unstamped(cleaned) == [train]
    assert report.contaminated["arc_easy"] == 1 and sum(report.contaminated.values()) == 1
    # An answer that repeats a SciQ test passage (what the text suite's overlap score reads) is contaminated too.
    passage = next(i.support for i in load("sciq", "test", data_dir=data_dir) if len((i.support or "").split()) > 30)
    quoting = sft("Why do leaves change colour?", f"Here is what I know. {passage}")
    assert index.matches(quoting.messages[-1].content) == ["sciq"]
    assert index.sizes["sciq"] == len(load("sciq", "test", data_dir=data_dir))  # questions, not passages
    # A short passage is a textbook sentence an explanation may state: matched by n-grams only, never whole.
    short = next(i.support for i in load("sciq", "test", data_dir=data_dir)
                 if i.support and 5 <= len(i.support.split()) < 12)
    assert index.matches(f"As the textbook says, {short}") == []


def test_from_benchmarks_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ARC-Easy-Test\.jsonl does not exist"):
        ContaminationIndex.from_benchmarks(tmp_path, names=["arc_easy"])
    with pytest.raises(ValueError, match="unknown benchmark"):
        ContaminationIndex.from_benchmarks(tmp_path, names=["nope"])


def test_report_counts_add_up_and_render(redactor, tmp_path):
    index = ContaminationIndex.from_texts({"quiz": QUIZ})
    # Redaction runs first, so records that differ only in an email address compare as duplicates.
    records = [sft("Mail me at a@b.org: how do plants make food?", LONG_REPLY),  # redacted, kept
               sft("Mail me at c@d.org: how do plants make food?",
                   LONG_REPLY.replace("green light", "green wavelengths")),  # redacted, then a near dup
               sft("Why is the sky blue?", "Rayleigh scattering."),  # contaminated
               sft("Hi", ""),  # too short
               sft("Tell me a story.", "once " * 3000),  # too long
               sft("What is a cell?", "The smallest unit of life."),
               sft("What is a cell?", "The smallest unit of life.", item=7)]  # exact duplicate
    cleaned, report = clean(records, CleanOptions(), index=index, redactor=redactor)
    assert (report.pii_redacted, report.near_duplicates, report.too_short, report.too_long,
            report.exact_duplicates, report.contaminated) == (2, 1, 1, 1, 1, {"quiz": 1})
    assert report.input - report.removed == report.output == len(cleaned) == 2
    assert report.to_dict()["removed"] == 5
    json.dumps(report.to_dict())  # serializable as it is, for a run's metrics file

    console = Console(record=True, width=160)
    console.print(report.table())
    text = console.export_text()
    for label in ("input", "PII redacted", "contaminated: quiz", "too short", "too long", "exact duplicates",
                  "near duplicates", "output", "#1: like #0"):
        assert label in text

    source, destination = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(r.model_dump_json() + "\n" for r in records))
    assert clean_file(source, destination, SFTExample, index=index, redactor=redactor).to_dict() == report.to_dict()
    assert list(read_jsonl(destination, SFTExample)) == cleaned
    assert destination.stat().st_mode & 0o777 == 0o600  # a review export's students' words, as `data clean` writes


def test_options_are_checked():
    with pytest.raises(ValueError, match="near_dup_threshold"):
        CleanOptions(near_dup_threshold=1.5)
    assert CleanReport().removed == 0


def test_an_empty_against_list_is_refused_not_taken_as_no_check(tmp_path, capsys):
    import typer

    from cli.train import CleanFlags, _clean_and_write
    from zephyr.schemas import SFTExample

    with pytest.raises(typer.Exit):
        _clean_and_write([], tmp_path / "out.jsonl", SFTExample, clean=CleanFlags(against=" , "), title="x")
    assert "--against names no benchmark" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out.jsonl").exists()


def test_a_cleaned_review_export_no_longer_counts_as_every_verdict(tmp_path):
    """`eval gate --reviews` counts a win rate only from an export that kept every verdict; cleaning drops
    records (a duplicate here), so its output is stamped like `zephyr data review`'s. Other files stay as they were."""
    from datetime import UTC, datetime

    from typer.testing import CliRunner

    from cli.app import app
    from evals.preference import counts_every_verdict
    from service.review.export import ExportOptions, to_jsonl
    from service.review.stats import Judgement

    messages = [user("Why is the sky blue?")]
    generations = {g: {"id": g, "created_at": datetime(2026, 11, 1, tzinfo=UTC), "model": g, "messages": messages,
                       "response": [{"content": f"{LONG_REPLY} ({g})"}], "params": {}} for g in ("m", "c")}
    verdicts = [Judgement(item_id="m", reviewer=f"r{n}", kind="pair", label="served", strength=3, served_model="m",
                          candidate_id="c", candidate_model="c") for n in range(2)]
    text, count = to_jsonl(verdicts, generations, ExportOptions(format="dpo", include_flagged=True,
                                                                include_unfinished=True), redactor=None)
    export = tmp_path / "export.jsonl"
    export.write_text(text)
    assert count == 1 and counts_every_verdict(json.loads(text))

    out = tmp_path / "cleaned.jsonl"
    result = CliRunner().invoke(app, ["data", "clean", "--input", str(export), "--out", str(out), "--format", "dpo",
                                      "--no-decontaminate", "--no-pii"])
    assert result.exit_code == 0, result.output
    (cleaned,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert cleaned["meta"]["kept"]["for_training"] is True and not counts_every_verdict(cleaned)
    assert {k: v for k, v in cleaned["meta"]["kept"].items() if k != "for_training"} == \
        json.loads(text)["meta"]["kept"]

    other = [pair("Q?", "A good answer.", "A bad answer.", source="cloze")]
    assert unstamped(clean(other, CleanOptions(**OFF))[0]) == other  # no export's `kept`, no such stamp


def test_cleaning_stamps_each_record_with_the_steps_it_ran_and_no_clean_stamps_it_never_cleaned(tmp_path):
    """What `zephyr train` reads to refuse never-cleaned data: a cleaned record names its steps (a second cleaning
    adds to them), a record written with --no-clean says False, and `data clean` turns that into the steps."""
    from typer.testing import CliRunner

    from cli.app import app
    from cli.train import CleanFlags, _clean_and_write
    from training.data.clean import cleaning_of

    records = [sft(f"Why is the sky blue on day {i}?", LONG_REPLY) for i in range(3)]
    first, _ = clean(records[:1], CleanOptions(**OFF))
    assert first[0].meta["cleaned"] == ["length"] and cleaning_of(first[0].meta) == "cleaned_partly"
    again, _ = clean(first, CleanOptions(**{**OFF, "dedupe": True}))
    assert again[0].meta["cleaned"] == ["length", "dedupe"]
    assert cleaning_of(records[0].meta) == "unstamped" and cleaning_of(None) == "unstamped"

    raw = tmp_path / "raw.jsonl"
    _clean_and_write(records, raw, SFTExample, clean=CleanFlags(no_clean=True), title="x")
    assert [cleaning_of(r.meta) for r in read_jsonl(raw, SFTExample)] == ["never_cleaned"] * 3
    out = tmp_path / "cleaned.jsonl"
    result = CliRunner().invoke(app, ["data", "clean", "--input", str(raw), "--out", str(out), "--format", "sft",
                                      "--no-decontaminate", "--no-pii", "--near-dup", "0"])
    assert result.exit_code == 0, result.output
    assert [r.meta["cleaned"] for r in read_jsonl(out, SFTExample)] == [["length", "dedupe"]] * 3


@pytest.mark.parametrize("fmt", ["dpo", "kto", "sft"])
def test_cleaning_a_raw_review_export_leaves_out_what_data_review_would(fmt):
    """An export that keeps every verdict (for `eval gate --reviews`) holds answers cut off or written by the guard
    and chosen answers a reviewer flagged; `data clean` stamps its output fit to train on, so it leaves them out as
    `zephyr data review` does. Every format's raw export reads as never cleaned, so `zephyr train` refuses it."""
    from datetime import UTC, datetime

    from service.review.export import ExportOptions, to_jsonl
    from service.review.stats import Judgement
    from training.data.clean import cleaning_of
    from zephyr.schemas import KTOExample, PreferencePair

    messages = [user("Why is the sky blue?")]

    def generation(g: str, finish: str = "stop") -> dict:
        return {"id": g, "created_at": datetime(2026, 11, 1, tzinfo=UTC), "model": g, "messages": messages,
                "response": [{"content": f"{LONG_REPLY} ({g})", "finish_reason": finish}], "params": {}}

    generations = {"m": generation("m", "length"), "c": generation("c")}  # the served answer was cut off
    label = "candidate" if fmt == "kto" else "served"  # KTO keeps the cut-off loser too, as an undesirable answer
    verdicts = [Judgement(item_id="m", reviewer=f"r{n}", kind="pair", label=label, strength=3, served_model="m",
                          candidate_id="c", candidate_model="c") for n in range(2)]
    text, count = to_jsonl(verdicts, generations, ExportOptions(format=fmt, include_flagged=True,
                                                                include_unfinished=True), redactor=None)
    schema = {"dpo": PreferencePair, "kto": KTOExample, "sft": SFTExample}[fmt]
    records = [schema.model_validate_json(line) for line in text.splitlines()]
    assert count == len(records) >= 1
    assert all(cleaning_of(r.meta) == "never_cleaned" for r in records)  # `zephyr train` refuses the raw file
    unfit = sum(not r.meta["whole"] for r in records)
    assert unfit == 1  # the pair or the SFT example with a cut-off answer, or KTO's cut-off undesirable one
    cleaned, report = clean(records, CleanOptions(**OFF))
    assert report.unfit_for_training == unfit and report.output == len(cleaned) == count - unfit
    assert all(r.meta["whole"] and r.meta["kept"]["for_training"] for r in cleaned)
    assert report.removed == unfit


def test_a_pair_and_its_opposite_are_both_dropped_not_one_kept_as_a_near_duplicate():
    """Two reviewers who disagree: (P, A over B) and (P, B over A) were near-duplicates of each other (their
    shingles, replies joined, were the same set), and whichever came first was kept: one reviewer's preference, the
    conflict unreported (found by a review)."""
    other = ("Leaves look green because chlorophyll absorbs red and blue light for photosynthesis and reflects "
             "the green part of sunlight back to our eyes, which is the colour we then see.")
    records = [pair("Why is the sky blue?", LONG_REPLY, other), pair("Why is the sky blue?", other, LONG_REPLY),
               pair("Why is the sea salty?", LONG_REPLY, other)]
    cleaned, report = clean(records, CleanOptions(**{**OFF, "dedupe": True, "near_dup_threshold": 0.9}))
    assert unstamped(cleaned) == [records[2]]
    assert report.conflicting == 2 and report.near_duplicates == 0 and report.output == 1
    assert report.input - report.removed == report.output
    console = Console(width=200, record=True)
    console.print(report.table())
    assert "conflicting (a pair and its opposite: both)" in console.export_text()


def test_a_pair_whose_answers_read_alike_is_dropped_even_when_redaction_made_them_so(redactor):
    records = [pair("Who do I write to?", "Write to jane@school.edu about it.", "Write to bob@gmail.com about it."),
               pair("Is it right?", "Yes.  It is!", "Yes. It is!"),
               # case and signs are meaning: a genotype, a direction
               pair("Which genotype?", "rr", "RR"), pair("Which velocity?", "-2 m/s", "2 m/s"),
               pair("Why is the sky blue?", "Rayleigh scattering of sunlight.", "No idea.")]
    options = CleanOptions(**{**OFF, "redact_pii": True, "dedupe": True})
    cleaned, report = clean(records, options, redactor=redactor)
    assert [r.prompt[0].content for r in cleaned] == ["Which genotype?", "Which velocity?", "Why is the sky blue?"]
    assert report.no_preference == 2 and report.input - report.removed == report.output == 3


def test_a_bad_against_list_or_an_unwritable_folder_is_refused_before_sampling(tmp_path, monkeypatch):
    """--against was first read when the samples were written (39 minutes into `data chat-answers`), and an
    output folder that exists but cannot be written passed the check (making a folder that is there succeeds)."""
    from typer.testing import CliRunner

    from cli import train as train_cli
    from cli.app import app
    from zephyr import paths

    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(train_cli, "_sampling_engine", lambda *a, **k: pytest.fail("sampled before the check"))
    (tmp_path / "answers.jsonl").write_text("")
    refused = CliRunner().invoke(app, ["data", "chat-answers", "--out", str(tmp_path / "p.jsonl"), "--sources",
                                       "arc_easy:train", "--limit-per-source", "2", "--answers-from",
                                       str(tmp_path / "answers.jsonl"), "--against", "arc_easy,sciqq"])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "sciqq" in said and "Traceback" not in said, said

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = paths.os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
    refused = CliRunner().invoke(app, ["data", "science", "--out", str(read_only / "p.jsonl"), "--no-clean"])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 1 and f"cannot write {read_only / 'p.jsonl'}" in said, said
    assert "its folder is not writable here" in said


def test_an_output_to_a_pipe_or_a_new_file_under_dev_passes_the_check(tmp_path, monkeypatch):
    """The review of the first check: `--out /dev/stdout` into a pipe was resolved to `/proc/PID/fd/pipe:[N]`,
    which is no file, and refused; so was a new file under /dev/shm."""
    import os

    from typer.testing import CliRunner

    from cli.app import app
    from zephyr.paths import check_writable

    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    read, write = os.pipe()
    try:
        result = CliRunner().invoke(app, ["data", "restate", "--sources", "arc_easy:train", "--limit-per-source", "2",
                                          "--out", f"/proc/self/fd/{write}", "--no-clean"])  # /dev/stdout, piped
        assert result.exit_code == 0, result.output
        assert len(os.read(read, 1 << 16).decode().splitlines()) == 2
    finally:
        os.close(read)
        os.close(write)
    if Path("/dev/shm").is_dir():
        check_writable("/dev/shm/zephyr-not-made.jsonl")
        assert not Path("/dev/shm/zephyr-not-made.jsonl").exists()
