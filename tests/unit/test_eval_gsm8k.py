"""GSM8K final-number extraction and prompts."""

from __future__ import annotations

import pytest

from evals.gsm8k import COT_INSTRUCTION, extract_answer, is_correct, messages_for, normalize_number
from offline.benchmarks import GSM8KItem


@pytest.mark.parametrize(("text", "expected"), [
    ("So she makes 9 * 2 = 18 dollars.\nThe answer is 18.", "18"),
    ("The answer is $1,234.", "1234"),
    ("The answer is: 1,234.50 dollars", "1234.5"),
    ("The temperature fell to -7 degrees, so the answer is -7.", "-7"),
    ("It costs 3.0 dollars", "3"),
    ("0.25 of the cake", "0.25"),
    ("He runs 12 km on Monday and 15 km on Tuesday.", "15"),  # no marker: the last number
    ("First 5 then 7,000 meters.", "7000"),
    ("#### 72", "72"),
    ("The answer is 8. Check: 4 + 4 = 8, and 10 - 2 = 8 too; 99 is wrong.", "8"),  # the marker beats later numbers
    ("I do not know.", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_number():
    assert normalize_number("1,000") == "1000" and normalize_number("007") == "7"
    assert normalize_number("-0.50") == "-0.5" and normalize_number("abc") is None


def test_is_correct_compares_numbers_not_strings():
    item = GSM8KItem(id="g", question="q", solution="s", answer="1000")
    assert is_correct("The answer is 1,000.00", item)
    assert not is_correct("The answer is 100", item)
    assert not is_correct("no idea", item)


def test_five_shot_puts_worked_solutions_before_the_question():
    shots = [GSM8KItem(id=f"s{i}", question=f"Shot {i}?", solution=f"2 + {i} = <<2+{i}={2 + i}>>{2 + i}",
                       answer=str(2 + i)) for i in range(5)]
    item = GSM8KItem(id="t", question="Test?", solution="", answer="1")
    messages = messages_for(item, "You are a tutor.", shots)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 5 + ["user"]
    assert messages[2]["content"] == "2 + 0 = 2\nThe answer is 2."  # calculator annotations removed
    assert messages[-1]["content"] == f"Test?\n{COT_INSTRUCTION}"
    assert [m["role"] for m in messages_for(item, None, [])] == ["user"]
