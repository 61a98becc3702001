import pytest
from pydantic import ValidationError

from zephyr.schemas import DataFileError, MCQItem, PreferencePair, read_jsonl, write_jsonl


def test_round_trip_and_line_numbers_in_errors(tmp_path):
    pair = PreferencePair(prompt=[{"role": "user", "content": "Why is ice slippery?"}],
                          chosen=[{"role": "assistant", "content": "A thin film of water..."}],
                          rejected=[{"role": "assistant", "content": "Because it is cold."}],
                          source="review", meta={"item": 3})
    path = tmp_path / "pairs.jsonl"
    assert write_jsonl(path, [pair, pair]) == 2
    assert list(read_jsonl(path, PreferencePair)) == [pair, pair]

    path.write_text(path.read_text() + '{"prompt": [], "chosen": [], "rejected": [], "source": "x"}\n')
    with pytest.raises(DataFileError, match=r"pairs.jsonl:3: not a PreferencePair"):
        list(read_jsonl(path, PreferencePair))


def test_mcq_item_answer_must_be_one_of_its_letters():
    MCQItem(id="1", question="q", options=["a", "b", "c"], answer="C")
    with pytest.raises(ValueError, match="not one of the option letters"):
        MCQItem(id="1", question="q", options=["a", "b"], answer="C")


@pytest.mark.parametrize("answer", ["", "AB", "ABC", "D"])
def test_an_mcq_items_answer_is_exactly_one_of_its_letters(answer):
    """`"" in "ABC"` holds: a blank answer was taken, and read as option A downstream."""
    with pytest.raises(ValidationError, match="not one of the option letters"):
        MCQItem(id="q", question="Which?", options=["a", "b", "c"], answer=answer)


def test_a_file_that_is_not_utf8_names_itself(tmp_path):
    path = tmp_path / "pairs.jsonl"
    item = b'{"id": "q", "question": "Which?", "options": ["a", "b"], "answer": "A"}\n'
    path.write_bytes(item * 5000 + b'\xff\xfe broken\n')
    with pytest.raises(DataFileError, match=r"pairs.jsonl:5001: not UTF-8 text"):
        list(read_jsonl(path, MCQItem))


def test_a_bad_record_names_its_field_and_a_byte_order_mark_is_named(tmp_path):
    """"not a PreferencePair: Field required" named no field; a file saved with a BOM read as "Invalid JSON"."""
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": [{"role": "user", "content": "q"}], '
                    '"chosen": [{"role": "assistant", "content": "a"}]}\n')
    with pytest.raises(DataFileError, match=r"pairs.jsonl:1: not a PreferencePair: rejected: Field required"):
        list(read_jsonl(path, PreferencePair))
    path.write_text("\ufeff" + path.read_text())
    with pytest.raises(DataFileError, match="starts with a byte-order mark: save it as UTF-8 without one"):
        list(read_jsonl(path, PreferencePair))
