import pytest

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
