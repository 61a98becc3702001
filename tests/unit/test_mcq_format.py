import pytest

from zephyr import mcq


def test_list_and_letter_keyed_options_render_the_same_prompt(tokenizer):
    from_list = mcq.MCQuestion.build("Which gas do plants absorb?", ["Oxygen", "Carbon dioxide", "Helium"])
    keyed = {"A": "Oxygen", "B": "Carbon dioxide", "C": "Helium"}
    from_dict = mcq.MCQuestion.build("Which gas do plants absorb?", keyed)
    assert from_list == from_dict
    prompt = mcq.render_prompt(tokenizer, from_list)
    assert "A. Oxygen\nB. Carbon dioxide\nC. Helium" in prompt
    assert prompt.rstrip().endswith("assistant")  # the next token is the answer itself


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["only one"], "between 2 and 10"),
        ([f"option {i}" for i in range(11)], "between 2 and 10"),
        (["Oxygen", " Oxygen "], "duplicates"),
        (["Oxygen", ""], "option B must be a non-empty string"),
        (["Oxygen", 3], "option B must be a non-empty string"),
        # found by a review: invisible format characters alone were an option, scored and shown blank
        (["Oxygen", "\u200b"], "option B must be a non-empty string \\(visible characters\\)"),
        (["Oxygen", "\ufeff \u00ad\u2060\u200e"], "option B must be a non-empty string"),
        (["Oxygen", "Oxy\u200bgen"], "options A, B are duplicates"),
        ({"A": "x", "C": "y"}, "keys must be the letters A, B"),
        ("AB", "must be a list"),
    ],
)
def test_bad_options_say_what_to_fix(options, message):
    """(Options that differ in case differ: genotypes, chemical symbols, units; see the test below.)"""
    with pytest.raises(mcq.MCQFormatError, match=message):
        mcq.MCQuestion.build("q?", options)


def test_every_letter_is_one_distinct_token_with_and_without_space(tokenizer):
    for leading_space in (False, True):
        ids = mcq.letter_token_ids(tokenizer, mcq.MAX_OPTIONS, leading_space)
        assert len(set(ids)) == mcq.MAX_OPTIONS
        decoded = [tokenizer.decode([i]) for i in ids]
        assert [d.strip() for d in decoded] == list(mcq.LETTERS)
        assert all(d.startswith(" ") == leading_space for d in decoded)


def test_reasoning_prompt_ends_with_answer_cue(tokenizer):
    q = mcq.MCQuestion.build("2+2?", ["3", "4"])
    prompt = mcq.render_prompt(tokenizer, q, explain=True, reasoning="Two plus two is four.  ")
    assert prompt.endswith("Two plus two is four." + mcq.FINAL_ANSWER_CUE)
    assert mcq.EXPLAIN_INSTRUCTION in prompt


def test_an_arc_file_with_a_trailing_blank_line_reads(tmp_path):
    import json

    from zephyr.mcq import read_arc_jsonl

    path = tmp_path / "arc.jsonl"
    record = {"question": {"stem": "Which is a metal?", "choices": [{"text": "copper"}, {"text": "glass"}]}}
    path.write_text(json.dumps(record) + "\n\n")
    assert [q.options for q in read_arc_jsonl(path)] == [("copper", "glass")]


def test_the_explain_budget_keeps_room_for_the_answer_cue_within_the_prompt_limit():
    from zephyr.mcq import EXPLAIN_CUE_MARGIN, explain_budget

    assert explain_budget(100, 2048, None, 256) == 256  # room to spare: the setting's cap
    assert explain_budget(1900, 2048, None, 256) == 2047 - 1900 - EXPLAIN_CUE_MARGIN  # the context binds
    assert explain_budget(1900, 2048, 1950, 256) == 1950 - 1900 - EXPLAIN_CUE_MARGIN  # ZEPHYR_MAX_PROMPT_TOKENS
    assert explain_budget(1900, 2048, 9999, 256) == 2047 - 1900 - EXPLAIN_CUE_MARGIN  # never past the context
    assert explain_budget(2040, 2048, None, 256) < 1  # the service refuses it (400 naming explain)


@pytest.mark.parametrize("options", [["RR", "Rr", "rr", "R"], ["Co", "CO", "C", "O"], ["mW", "MW", "W", "kW"]])
def test_options_that_differ_in_case_are_different_options(options):
    """Refused as duplicates: /mcq answered a genotype question (MMLU high-school biology) with a 400, and chat
    answered it as no question at all, while offline accuracy counted it."""
    assert mcq.MCQuestion.build("Which?", options).options == tuple(options)


def test_a_question_of_invisible_characters_alone_is_refused():
    with pytest.raises(mcq.MCQFormatError, match="`question` must be a non-empty string"):
        mcq.MCQuestion.build("\u200b\u2060", ["a", "b"])


def test_joiners_and_tags_that_shape_what_is_seen_make_options_differ():
    """Found by a review: every format character was left out, and the flags of England and Scotland (tag
    characters), a family emoji and its three people (zero-width joiners) were refused as duplicates."""
    for options in (["\U0001F3F4\U000E0067\U000E0062\U000E0065\U000E006E\U000E0067\U000E007F",
                     "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F"],
                    ["\U0001F468\u200d\U0001F469\u200d\U0001F467", "\U0001F468\U0001F469\U0001F467"],
                    ["\u0600", "b"]):
        assert len(mcq.MCQuestion.build("Which?", options).options) == 2
