"""How the chat-MCQ probe reads an answer: the option it commits to, and whether it goes back on it."""

from __future__ import annotations

import pytest

from tools.chat_mcq_probe import read_answer

OPTIONS = ["Vitamin C", "Vitamin A", "Iron", "Zinc"]


@pytest.mark.parametrize(("text", "expected"), [
    # the service's own opening names the option's text, which ends in a capital letter: no second label
    ("The answer is B) Vitamin A. This is because carrots hold it.", ("B", False)),
    ("The answer is (B).", ("B", False)),
    ("B) Vitamin A", ("B", False)),
    # restating it, or a letter that is a word ("vitamin A:", "type A."), is no other option named
    ("The answer is B) Vitamin A. Carrots have it. So, the answer is B) Vitamin A.", ("B", False)),
    ("The answer is B) Vitamin A. Carrots have vitamin A: it helps vision.", ("B", False)),
    ("The answer is B) Vitamin A. But actually C) Iron is right.", ("B", True)),
    ("The answer is B) Vitamin A. No wait, the answer is C.", ("B", True)),
    ("I think it's Iron.", ("C", False)),  # no label: the one option it names
])
def test_an_answer_is_read_for_its_option_and_whether_it_contradicts_it(text, expected):
    assert read_answer(text, OPTIONS) == expected
