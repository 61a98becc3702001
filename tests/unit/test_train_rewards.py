"""GRPO's verifiable rewards read a completion as /mcq with explain does: the letter after the first answer line."""

from __future__ import annotations

import pytest

from training.rewards import answer_format, answer_letter, correct_letter


@pytest.mark.parametrize(("text", "letter"), [
    ("Plants need light to make sugar.\n\nAnswer: B", "B"),
    ("Because of gravity. Answer: **C**", "C"),
    ("Reasoning.\nanswer: (A) the moon", "A"),
    ("It is D. Answer: B. Later: Answer: C", "B"),     # the first answer line counts, as /mcq stops there
    ("No answer line at all, just D.", None),
    ("Answer: E", None),                                # not an option letter of an A-D question
    ("Answer: Because it is big", None),                # a word, not a letter
    ("Answer:", None),
    ("Answer: A plant makes sugar from light.", None),  # the article, not option A (found by a review)
    ("Answer: I think it is B", None),
    ("Answer: A.", "A"),
    ("Answer: A is right: plants make sugar", "A"),
    ("Answer: (A) the moon", "A"),
    ("Answer: C, because the moon has no air", "C"),
    ("Answer: **D** the sun", "D"),
    ("Answer: B \nbecause", "B"),
    ("Answer: B because it is", "B"),  # after a letter that is no word, what follows is the option's reason
    ("Answer: B - the moon", "B"),
    ("Answer: B is correct", "B"),
    ("Answer: B\tmoon", "B"),
    ("Answer: D the sun", "D"),
])
def test_answer_letter_is_the_first_letter_after_the_first_answer_line(text, letter):
    assert answer_letter(text, "ABCD") == letter


def test_correct_letter_scores_conversational_and_plain_completions():
    completions = [[{"role": "assistant", "content": "Air is a gas.\nAnswer: B"}],
                   [{"role": "assistant", "content": "Rock.\nAnswer: A"}],
                   "Plain text. Answer: B",
                   "no answer"]
    assert correct_letter(completions, answer=["B", "B", "B", "B"], letters=["AB"] * 4) == [1.0, 0.0, 1.0, 0.0]


def test_answer_format_needs_reasoning_then_a_valid_letter():
    completions = ["Air is made of gases such as nitrogen.\nAnswer: B", "Answer: B", "Air is made of gases. Answer: Z",
                   "Air is made of gases, so it is a gas."]
    assert answer_format(completions, letters=["AB"] * 4) == [1.0, 0.0, 0.0, 0.0]


def test_the_format_reward_wants_words_of_its_own_not_filler_or_the_question_echoed():
    asked = "Which gas do plants take in for photosynthesis?\nA. oxygen\nB. carbon dioxide"
    prompt = [{"role": "user", "content": asked}]
    completions = ["aaaaaaaaaaaaaaaaaaaa Answer: A",
                   "Which gas do plants take in for photosynthesis? Answer: B",
                   "Plants absorb carbon dioxide through leaf pores.\nAnswer: B"]
    assert answer_format(completions, letters=["AB"] * 3, prompts=[prompt] * 3) == [0.0, 0.0, 1.0]


def test_a_length_mismatch_is_an_error_not_a_silent_truncation():
    with pytest.raises(ValueError):
        correct_letter(["Answer: A"], answer=["A", "B"], letters=["AB", "AB"])


def test_verifiable_prompts_are_what_mcq_explain_asks_with_the_keys_letter():
    from training.data.verifiable import explain_prompts
    from zephyr import mcq
    from zephyr.schemas import MCQItem

    items = [MCQItem(id=f"t/{i}", question=f"Which is a metal ({i})?", options=["iron", "wood", "glass"],
                     answer="ABC"[i % 3]) for i in range(6)]
    items.append(MCQItem(id="t/bad", question="Which?", options=["same", "same "], answer="A"))  # refused by /mcq
    prompts, stats = explain_prompts(items, seed=1)
    assert stats.skipped == 1 and len(prompts) == 6 and sorted(p.meta["question_id"] for p in prompts) == \
        [f"t/{i}" for i in range(6)]
    for prompt in prompts:
        item = next(i for i in items if i.id == prompt.meta["question_id"])
        question = mcq.MCQuestion.build(item.question, item.options)
        assert [m.model_dump() for m in prompt.prompt] == mcq.render_messages(question, explain=True)
        assert (prompt.answer, prompt.letters) == (item.answer, "ABC")
    assert [p.meta["question_id"] for p in explain_prompts(items, seed=1)[0]] == [p.meta["question_id"]
                                                                                  for p in prompts]  # seeded
